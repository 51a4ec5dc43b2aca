"""`rlhf chat`: the multi-turn prompt loop both backends run (framework-free).

A backend gives :func:`chat_loop` only an ``answer_fn(prompt_ids) -> str`` (its greedy
generation of at most ``max_new_tokens`` tokens, stopped at the end-of-conversation token,
decoded) and the sizes from :func:`chat_options`; everything the user sees is decided here,
so the same exported model answers the same on torch and JAX.

The loop:

- writes a banner, then ``you> `` (flushed) before each read; when input is not a terminal
  the line read is echoed after it, so a piped transcript reads as a conversation;
- ``quit`` / ``exit``, end of input (Ctrl-D) and Ctrl-C (while reading or generating) end it
  with exit status 0; ``clear`` starts a new conversation; an empty line is ignored;
- any other line is a turn: the conversation so far (turns and answers, each answer ended by
  the end-of-conversation token, as in training) is the prompt, tokenised as the training
  prompts are (special tokens added) and cut from the left to the model's context minus the
  answer length; each turn that is cut writes a warning to stderr with the number of tokens
  dropped.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from shared.errors import InputError

__all__ = ["PROMPT_MARKER", "ChatOptions", "chat_loop", "chat_options"]

PROMPT_MARKER = "you> "
"""Written (and flushed) before each line is read."""

BANNER = "chat: type a prompt ('clear' starts over, 'quit' or 'exit' ends)"

_QUIT = ("quit", "exit")


@dataclasses.dataclass(frozen=True)
class ChatOptions:
    """Sizes and the end-of-conversation token of a chat."""

    context_tokens: int
    """The model's context (`max_position_embeddings` / `n_positions`): prompt + answer."""
    max_new_tokens: int
    """Longest answer (`data.max_answer_seq_len`)."""
    eos_id: int
    """The token that ends an answer (the end-of-conversation token's last id)."""
    eos_text: str
    """Appended to each answer in the conversation (the end-of-conversation token)."""

    @property
    def window(self) -> int:
        """Prompt tokens kept: the context less the answer."""
        return self.context_tokens - self.max_new_tokens


def chat_options(config: Any, tokenizer: Any, context_tokens: int | None) -> ChatOptions:
    """The options of a chat with a model whose context is ``context_tokens`` (None when the
    model config does not say: then `data.max_prompt_seq_len + data.max_answer_seq_len`)."""
    from shared.data.tokenize import end_of_conversation_ids

    eoc = end_of_conversation_ids(tokenizer, config.data.end_of_conversation_token)
    max_new = int(config.data.max_answer_seq_len)
    if context_tokens is None:
        context_tokens = int(config.data.max_prompt_seq_len) + max_new
    if context_tokens - max_new < 1:
        raise InputError(f"rlhf chat: data.max_answer_seq_len={max_new} leaves no room for a "
                         f"prompt in the model's context of {context_tokens} tokens; lower it")
    return ChatOptions(int(context_tokens), max_new, int(eoc[-1]), tokenizer.decode(eoc))


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def chat_loop(
    answer_fn: Callable[[Sequence[int]], str],
    tokenizer: Any,
    options: ChatOptions,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    echo: bool | None = None,
) -> int:
    """Runs the chat until quit/exit, end of input or Ctrl-C; returns the exit status (0).

    ``answer_fn`` gets the prompt's token ids (at most ``options.window``) and returns the
    answer's text. The streams default to ``sys``'s at call time; ``echo`` (default: stdin is
    not a terminal) writes each line read after the prompt marker.
    """
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    if echo is None:
        echo = not _is_terminal(stdin)

    def say(text: str, stream: TextIO = stdout) -> None:
        stream.write(text)
        stream.flush()

    say(BANNER + "\n")
    history = ""
    try:
        while True:
            say(PROMPT_MARKER)
            line = stdin.readline()
            if not line:  # end of input
                say("\n")
                break
            text = line.rstrip("\r\n")
            if echo:
                say(text + "\n")
            command = text.strip()
            if command in _QUIT:
                break
            if command == "clear":
                history = ""
                say("(conversation cleared)\n")
                continue
            if not command:
                continue
            prompt = history + text
            ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
            dropped = len(ids) - options.window
            if dropped > 0:
                say(f"chat: warning: dropped the first {dropped} tokens of the conversation "
                    f"({len(ids)} tokens; the model's context of {options.context_tokens} "
                    f"less {options.max_new_tokens} for the answer leaves {options.window})\n",
                    stderr)
                ids = ids[dropped:]
            answer = answer_fn(ids)
            say(answer + "\n")
            history = prompt + answer + options.eos_text
    except KeyboardInterrupt:  # Ctrl-C is a way to leave a chat
        say("\n")
    return 0

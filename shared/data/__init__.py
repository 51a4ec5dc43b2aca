"""Framework-free data layer: datasets -> fixed-shape numpy batches for both backends.

No torch or jax here; tokenizers are any Hugging Face `PreTrainedTokenizerBase`.
"""

from shared.data.batches import ArrayBatch as ArrayBatch
from shared.data.batches import PairwiseBatch as PairwiseBatch
from shared.data.batches import PromptBatch as PromptBatch
from shared.data.batches import RankingBatch as RankingBatch
from shared.data.batches import SFTBatch as SFTBatch
from shared.data.batches import TextBatch as TextBatch
from shared.data.config import FORMATS as FORMATS
from shared.data.config import STEPS as STEPS
from shared.data.config import DataConfig as DataConfig
from shared.data.config import DatasetSpec as DatasetSpec
from shared.data.hf_adapters import ADAPTERS as ADAPTERS
from shared.data.iterator import BatchIterator as BatchIterator
from shared.data.pipeline import StepData as StepData
from shared.data.pipeline import build_ptx_data as build_ptx_data
from shared.data.pipeline import build_step_data as build_step_data
from shared.data.pipeline import read_dataset as read_dataset
from shared.data.records import DataError as DataError
from shared.data.records import DataReport as DataReport
from shared.data.records import PairwiseExample as PairwiseExample
from shared.data.records import PromptExample as PromptExample
from shared.data.records import RankingExample as RankingExample
from shared.data.records import SFTExample as SFTExample
from shared.data.records import TextExample as TextExample
from shared.data.tokenize import check_pad_with_eos as check_pad_with_eos
from shared.data.tokenize import check_padding_at_beginning as check_padding_at_beginning
from shared.data.tokenize import encode_prompts as encode_prompts
from shared.data.tokenize import encode_responses as encode_responses
from shared.data.tokenize import end_of_conversation_ids as end_of_conversation_ids
from shared.data.tokenize import padding_at_beginning as padding_at_beginning
from shared.data.tokenize import prepare_tokenizer as prepare_tokenizer

"""Data: tokenizers, input files, ``fax prepare``, datasets and the sampler, chat layouts."""

from fax.data.dataset import (Batch, Sampler, TokenDataset, cache_dir, dataset_path, dataset_problems, default_corpus,
                              document_segments, open_split, stdlib_dir)
from fax.data.files import read_documents, read_records, text_files, write_atomic
from fax.data.prepare import FORMAT, PROMPT_FLAG, prepare
from fax.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, copy_tokenizer, get_tokenizer

__all__ = ["FORMAT", "PROMPT_FLAG", "Batch", "ByteTokenizer", "HFTokenizer", "Sampler", "TokenDataset", "Tokenizer",
           "cache_dir", "copy_tokenizer", "dataset_path", "dataset_problems", "default_corpus", "document_segments",
           "get_tokenizer", "open_split", "prepare", "read_documents", "read_records", "stdlib_dir", "text_files", "write_atomic"]

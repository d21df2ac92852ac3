"""Data: input files -> token shards on disk -> packed, shuffled, resumable training batches.

    prepare(tokenizer, files, out, val_fraction=0.1)        # text / JSONL / chat JSONL -> shards
    loader = TokenLoader(out, "train", batch_size=8, seq_len=256, vocab_size=cfg.vocab_size)
    batch = next(loader)        # Batch: tokens (B, T+1), loss_mask, segment_ids, positions
    state = loader.state_dict() # JSON-able; loader.load_state_dict(state) resumes exactly
"""

from .loader import Batch, TokenLoader
from .shards import (check_tokenizer, check_vocab, open_split, prepare, read_manifest, token_dtype,
                     write_shards)
from .corpora import prepare_shakespeare
from .sources import Document, read_documents, training_texts

__all__ = ["Batch", "TokenLoader", "prepare", "write_shards", "read_manifest",
           "open_split", "check_vocab", "check_tokenizer", "token_dtype", "Document", "read_documents",
           "training_texts", "prepare_shakespeare"]

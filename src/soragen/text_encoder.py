"""Stage 1: prompts -> text tokens [B, L, D] and their padding mask [B, L].

A pretrained T5 encoder (for example google/t5-v1_1-xxl) loads from a local folder or
hub id and stays frozen. Without one, a small T5 with the byte-level ByT5 tokenizer is
built from the config: no vocabulary file, every language, trained with the DiT.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from soragen.config import TextEncoderConfig
from soragen.errors import UserError, first_line

log = logging.getLogger("soragen")


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _hub_reachable() -> bool:
    """Whether the Hugging Face Hub may be asked for files: not set offline, and its host resolves (or a proxy is set)."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    truthy = {"1", "true", "yes", "on"}
    if any(os.environ.get(k, "").lower() in truthy for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
    except OSError:
        return False
    return True


def word_tokenizer(corpus: Iterable[str]):
    """A word-level tokenizer whose vocabulary is every word of `corpus` (CJK characters count as words).

    Lower-cased, punctuation split off, unknown words -> <unk>, </s> appended as T5 expects.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    words: set[str] = set()
    for text in corpus:
        words.update(w for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = splitter
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def saved_tokenizer(folder: Path):
    """The tokenizer saved in `folder` (save_pretrained), as a UserError naming the folder if it cannot be read."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the tokenizer in {folder}: {first_line(e)}") from None


class TextEncoder(nn.Module):
    """A T5 encoder and its tokenizer behind one call: list of prompts -> (tokens, mask)."""

    def __init__(self, t5: nn.Module, tokenizer, max_length: int, trainable: bool):
        super().__init__()
        self.t5 = t5
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.warn_truncation = True  # training reports its long captions once instead
        self.t5.requires_grad_(trainable)
        if not trainable:
            self.t5.eval()

    # -- construction -------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: TextEncoderConfig, corpus: Iterable[str] | None = None,
                    vocabulary: Path | None = None) -> "TextEncoder":
        """A randomly initialised small T5 (or the pretrained one if named).

        Its tokenizer is ByT5's bytes, or, with `tokenizer: words`, a word-level
        vocabulary built from `corpus` (the training captions), or the one saved
        in folder `vocabulary` when given (a resumed run keeps its word ids).
        """
        if cfg.pretrained is not None:
            if cfg.pretrained.startswith((".", "/", "~")) and not Path(cfg.pretrained).expanduser().is_dir():
                # a path (a hub id is "name" or "org/name"): say so at once instead of asking the hub
                raise UserError(f"T5 text encoder folder not found: {cfg.pretrained} (text_encoder.pretrained)")
            return cls.from_pretrained(cfg.pretrained, cfg.max_length)
        from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

        match cfg.tokenizer:
            case "byt5":
                tokenizer = ByT5Tokenizer()
            case "words" if vocabulary is not None:
                tokenizer = saved_tokenizer(vocabulary)
            case "words":
                if corpus is None:
                    raise UserError("text_encoder.tokenizer 'words' builds its vocabulary from training captions: "
                                    "pass a trained model (--model) or use tokenizer 'byt5'")
                tokenizer = word_tokenizer(corpus)
        t5_cfg = T5Config(
            vocab_size=len(tokenizer),
            d_model=cfg.d_model,
            d_kv=cfg.d_kv,
            d_ff=cfg.d_ff,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            use_cache=False,
        )
        return cls(T5EncoderModel(t5_cfg), tokenizer, cfg.max_length, trainable=cfg.trainable)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, max_length: int, *, tokenizer_path: str | Path | None = None, trainable: bool = False
    ) -> "TextEncoder":
        """Load a T5 encoder (safetensors only) and its tokenizer from a folder or hub id."""
        from transformers import AutoTokenizer, T5EncoderModel

        _quiet_transformers()
        tok_source = tokenizer_path if tokenizer_path is not None else path

        def load(local_only: bool):
            from transformers.utils import logging as hf_logging

            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # its load report of missing weights becomes the one line below
            try:
                t5, info = T5EncoderModel.from_pretrained(str(path), use_safetensors=True, local_files_only=local_only,
                                                          output_loading_info=True)
            finally:
                hf_logging.set_verbosity(verbosity)
            if info["missing_keys"]:  # transformers would start them at random and carry on
                missing = sorted(info["missing_keys"])
                raise UserError(f"the T5 text encoder in '{path}' lacks {len(missing)} of its weights (e.g. "
                                f"{missing[0]}): its model.safetensors is incomplete or from another model; write "
                                "it again with save_pretrained")
            try:
                return t5, AutoTokenizer.from_pretrained(str(tok_source), local_files_only=local_only)
            except (OSError, ValueError) as e:
                if tokenizer_path is None or not Path(tok_source).expanduser().is_dir():
                    raise
                # A model folder's own tokenizer/ (beside the T5, which loaded): name it, not the T5.
                raise UserError(f"cannot load the tokenizer from '{tok_source}': {first_line(e)} (expected the files "
                                "a tokenizer's save_pretrained writes, e.g. tokenizer.json)") from None

        try:
            try:
                t5, tokenizer = load(local_only=True)  # a folder, or a hub id already in the Hugging Face cache
            except OSError:
                if all(Path(p).expanduser().is_dir() for p in (path, tok_source)):
                    raise
                # A hub id not in the cache: the network only when it is reachable (offline, every
                # request would be retried for half a minute before failing).
                if not _hub_reachable():
                    raise UserError(
                        f"T5 text encoder '{path}' is not in the Hugging Face cache and the Hub cannot be reached: "
                        "download it where there is a network (hf download ...) or set text_encoder.pretrained "
                        "to a folder with config.json and model.safetensors"
                    ) from None
                t5, tokenizer = load(local_only=False)
        except UserError:
            raise
        except (OSError, ValueError, SafetensorError) as e:
            raise UserError(
                f"cannot load the T5 text encoder from '{path}': {first_line(e)} "
                "(expected a folder with config.json and model.safetensors, as written by save_pretrained)"
            ) from None
        if len(tokenizer) > t5.config.vocab_size:  # its last ids would index past the T5's embedding
            raise UserError(f"the tokenizer in '{tok_source}' has {len(tokenizer)} tokens but the T5 text encoder in "
                            f"'{path}' embeds {t5.config.vocab_size}: they are not one model's; use the tokenizer "
                            "saved with it")
        return cls(t5, tokenizer, max_length, trainable=trainable)

    def save(self, text_encoder_dir: Path, tokenizer_dir: Path) -> None:
        """Write the T5 (safetensors) and its tokenizer in the Hugging Face layout."""
        _quiet_transformers()
        self.t5.save_pretrained(text_encoder_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(tokenizer_dir)

    # -- use ----------------------------------------------------------------

    @property
    def dim(self) -> int:
        """D: width of the text tokens."""
        return self.t5.config.d_model

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask [B, L], truncated to max_length with a warning."""
        if self.warn_truncation:  # untruncated lengths only to warn (training turns it off: one pass a batch)
            full = self.tokenizer(prompts, add_special_tokens=True)["input_ids"]
            for prompt, ids in zip(prompts, full):
                if len(ids) > self.max_length:
                    log.warning(
                        "prompt truncated to the text encoder's limit of %d tokens (it had %d): '%s...'",
                        self.max_length, len(ids), prompt[:40],
                    )
        batch = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return batch["input_ids"], batch["attention_mask"].bool()

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts: tokens [B, L, D] (padding zeroed) and mask [B, L] (True = real token)."""
        ids, mask = self.tokenize(prompts)  # (B, L), (B, L)
        device = next(self.t5.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        tokens = self.t5(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, L, D)
        tokens = tokens * mask[..., None]  # padding never leaks into pooled text
        return tokens, mask

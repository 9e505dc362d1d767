"""Build a transformers causal LM from its config class: no hub download, ever.

The model's vocabulary and special-token ids come from the tokenizer, so the spec's
``model.config`` may not set them. Counting parameters uses the meta device, which
costs no memory, so the plan can show model size before any worker starts.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from branchout.stages.job import ImportJob

# Set by the tokenizer; a spec that sets them would silently disagree with it.
TOKENIZER_OWNED_KEYS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")


class ModelConfigError(ValueError):
    """The model section names an unknown type or unknown config fields."""


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def build_config(model_type: str, overrides: dict[str, Any], vocab_size: int,
                 special_ids: dict[str, int] | None = None):
    """Return a ``PretrainedConfig`` for ``model_type`` with ``overrides`` applied.

    Raises:
        ModelConfigError: unknown type, not a causal LM, or an override the config
            class does not define (transformers would accept and ignore it).
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ModelConfigError(f"unknown model type {model_type!r}")
    if model_type not in causal_lm_types():
        raise ModelConfigError(f"model type {model_type!r} has no causal-LM head in transformers")
    config_cls = CONFIG_MAPPING[model_type]
    known = set(config_cls().to_dict()) | set(getattr(config_cls, "attribute_map", {}))
    unknown = sorted(k for k in overrides if k not in known)
    if unknown:
        raise ModelConfigError(f"{config_cls.__name__} has no field(s): {', '.join(unknown)}")
    owned = sorted(k for k in overrides if k in TOKENIZER_OWNED_KEYS)
    if owned:
        raise ModelConfigError(f"{', '.join(owned)} come(s) from the tokenizer; remove from model.config")
    try:
        return AutoConfig.for_model(model_type, **overrides, vocab_size=vocab_size, **(special_ids or {}))
    except Exception as e:  # config classes validate with many exception types; all mean "bad value"
        raise ModelConfigError(f"{config_cls.__name__} rejected the values: {' '.join(str(e).split())[:300]}") from None


def max_positions(config) -> int | None:
    """Longest sequence the model's position scheme allows, when it declares one."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_causal_lm(path: str, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(path)`` without the Hugging Face Hub's kernels.

    transformers 5 swaps layers for kernels it downloads from the Hub whenever the
    ``kernels`` package is installed (``use_kernels`` defaults on), at the model's first
    ``train()``/``eval()``. On a GPU worker without Hub access that fails the job (seen on an
    H200: "Kernel repository 'kernels-community/rotary' could not verify publisher trust
    status"), and where it succeeds it runs a remote publisher's code. branchout's own speed
    switches are ``stages.training.kernels``.
    """
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, use_kernels=False, **kwargs)


def build_model(config, seed: int | None = None):
    """A freshly initialised causal LM (fp32). Seeded so workers agree on init."""
    import torch
    from transformers import AutoModelForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


# Deeper models are built with fewer layers for counting and module names: every layer
# has the same names and size, and building 10^6 layers, even on the meta device, hangs.
MAX_META_LAYERS = 8


def meta_model(config, layers: int | None = None):
    """The model on the meta device: shapes and module names, no memory."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    if layers is not None:
        config = copy.deepcopy(config)
        config.num_hidden_layers = layers
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:layers]
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def parameter_counts(config) -> tuple[int, int]:
    """(total, non-embedding) parameters of ``config``'s model, without building it whole.

    Deep configs are counted from 1- and 2-layer builds: per-layer size × layers plus the
    rest, which is exact for the uniform decoder stacks of causal LMs.
    """
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers <= MAX_META_LAYERS:
        return count_parameters(meta_model(config))
    one = count_parameters(meta_model(config, 1))
    two = count_parameters(meta_model(config, 2))
    return tuple(a + (b - a) * (layers - 1) for a, b in zip(one, two, strict=True))


def count_parameters(model) -> tuple[int, int]:
    """(total, non-embedding) parameters; embeddings are excluded from FLOPs counts."""
    total = sum(p.numel() for p in model.parameters())
    embedding = 0
    emb = model.get_input_embeddings()
    if emb is not None:
        embedding += emb.weight.numel()
    pos = getattr(getattr(model, "transformer", None), "wpe", None)
    if pos is not None:
        embedding += pos.weight.numel()
    return total, total - embedding


def default_lora_targets(model_type: str) -> list[str] | None:
    """peft's per-architecture default target modules, if it knows the type."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as M

    targets = M.get(model_type)
    return list(targets) if targets else None


def missing_lora_targets(model, targets: list[str]) -> list[str]:
    """Targets that match no module name (peft matches by name suffix)."""
    names = [name for name, _ in model.named_modules()]
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def prepare_model(job, tokenizer, shared_base: dict | None = None, zero3_config: dict | None = None):
    """The model a job trains: fresh (pretrain, scratch), the parent (full), or parent + LoRA.

    ``job`` is a ``stages.job.TrainJob``. Fine-tunes load the parent in fp32: the
    optimizer's master weights must be full precision whatever the parent was saved in.
    ``shared_base`` holds the parent's weights as read-only numpy arrays from Ray's object
    store (see ``shared_base_weights``): a LoRA job uses them in place, a full fine-tune
    takes a private copy, and neither reads the parent from storage.

    ``zero3_config`` (the job's DeepSpeed config, ZeRO-3 only): build under
    ``deepspeed.zero.Init`` (see ``zero3_construction``), so each rank only ever holds its
    shard plus the layer being built or loaded. Every rank must call it then.
    """
    import torch

    from branchout.storage.checkpoint import fetch_verified

    seed = job.spec().seed  # the spec's own default, not one restated here
    partitioned = zero3_construction(zero3_config) if zero3_config else contextlib.nullcontext()
    if job.kind == "pretrain" and job.model_path:  # continued pretraining of an existing model
        with partitioned:
            model = load_causal_lm(source_dir(job.model_path, job.model_revision), revision=job.model_revision,
                                   dtype=torch.float32)
        return _checkpointed(model, job)
    if job.kind in ("pretrain", "scratch"):
        with partitioned:
            model = build_model(job_config(job, tokenizer), seed=seed)
        return _checkpointed(model, job)
    if shared_base is not None and zero3_config is None:
        model = model_on_weights(job, tokenizer, shared_base, copy=job.method != "lora")
    else:
        base_dir = fetch_verified(job.base_model_uri)
        with partitioned:  # under ZeRO-3 transformers loads the parent layer by layer into the shards
            model = load_causal_lm(base_dir, dtype=torch.float32)
    model = _checkpointed(model, job)
    if job.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = job.spec().lora
        torch.manual_seed(seed)
        model = get_peft_model(model, LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=lora.target_modules or default_lora_targets(model.config.model_type),
            task_type="CAUSAL_LM"))
        # drawn from the job's own seed, as an adapter farm draws a member's (stages.training.farm)
        from branchout.stages.training.farm import seed_peft_adapter

        seed_peft_adapter(model, seed)
    return model


def job_config(job, tokenizer):
    """The architecture a job builds: the given model's own config.json (``model.path``), or
    the spec's type and overrides sized to the tokenizer."""
    from branchout.stages.prepare.tokenizer import special_token_ids

    if job.model_path:
        return source_config(job.model_path, job.model_revision)
    return build_config(job.model_type, job.model_overrides, len(tokenizer), special_token_ids(tokenizer))


def source_config(path: str, revision: str | None = None):
    """config.json of an existing model: a local directory, a storage URI, or a hub id.

    Raises:
        ModelConfigError: one line naming the path and what went wrong.
    """
    import json

    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from branchout import storage

    if "://" in path or os.path.isdir(path):
        uri = storage.join(path, "config.json")
        if not storage.exists(uri):
            raise ModelConfigError(f"{path}: no config.json (not a Hugging Face model directory)")
        values = json.loads(storage.read_text(uri))
        kind = values.get("model_type")
        if kind not in CONFIG_MAPPING or kind not in causal_lm_types():
            raise ModelConfigError(f"{path}: model_type {kind!r} is not a causal LM transformers knows")
        return CONFIG_MAPPING[kind].from_dict(values)
    try:
        return AutoConfig.from_pretrained(path, revision=revision)
    except Exception as e:  # offline, unknown repo, gated: all one line for the user
        first = " ".join(str(e).split())[:160]
        raise ModelConfigError(f"{path!r} is not a local directory and the Hugging Face hub cannot provide it "
                               f"({type(e).__name__}: {first}); download it first "
                               f"(huggingface-cli download {path} --local-dir DIR) and give DIR") from None


def source_dir(path: str, revision: str | None = None) -> str:
    """Where ``from_pretrained`` reads an existing model: a local directory as it is, a
    published copy (manifest) verified, any other storage URI downloaded, a hub id as is."""
    from branchout import storage
    from branchout.storage import checkpoint

    if "://" not in path:
        return path  # a local folder, or a hub id transformers resolves itself
    if checkpoint.is_published(path):
        return checkpoint.fetch_verified(path)
    return storage.download_dir(path)


def zero3_config(job, tokenizer, world_size: int, use_gpu: bool) -> dict | None:
    """The DeepSpeed config ``prepare_model`` builds a ZeRO-3 job's model under, else None.

    It is the config ``stages.training.engine.DeepSpeedEngine`` derives from the built model, so
    the partitioning at construction and the engine's agree.
    """
    from branchout.stages.training.engine import deepspeed_config, model_hidden_size

    t = job.spec()
    if t.deepspeed.zero_stage != 3:
        return None
    config = job_config(job, tokenizer)
    return deepspeed_config(t, world_size, use_gpu, model_hidden_size(config))


@contextlib.contextmanager
def zero3_construction(ds_config: dict):
    """Models built or loaded inside are ZeRO-3 partitioned as they are constructed.

    transformers' own DeepSpeed integration does the work: with an ``HfDeepSpeedConfig``
    alive, ``from_config`` / ``from_pretrained`` run under ``deepspeed.zero.Init`` (each
    module's parameters are sharded as soon as it is built), initialise weights on rank 0
    one module at a time with the parameters gathered (and broadcast), and load
    checkpoints layer by layer. A 7B model in fp32 is 27 GB: built whole on every rank of
    a node, as ZeRO-2 does, that is 8 × 27 GB of host memory before training starts.
    The config is unset on exit so that later loads in this process (evaluation, export)
    are ordinary ones.
    """
    from branchout.stages.training.ds_files import import_deepspeed

    deepspeed = import_deepspeed()
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    from branchout.stages.training.engine import skip_inference_comm_op

    # zero.Init reads the world size from deepspeed.comm, which wraps the process group
    # Ray Train made only once asked to; without this it partitions for a world of 1.
    skip_inference_comm_op()
    deepspeed.init_distributed()
    keep = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference to it
    try:
        yield keep
    finally:
        unset_hf_deepspeed_config()


def _checkpointed(model, job):
    """Activation checkpointing when the job asks for it. Non-reentrant checkpointing
    needs no input that requires grad, so it works on a frozen (LoRA) base too."""
    if job.spec().activation_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.2x renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def shared_base_weights(model_uri: str, dtype: str = "float32") -> dict:
    """The exported model's weights as numpy arrays in ``dtype``, for the object store.

    numpy has no bfloat16: bf16 weights travel as their raw 16 bits (``uint16``), which
    ``model_on_weights`` views as bfloat16 again without a copy. Causal LMs hold no
    integer weights, so the two cannot be confused.
    """
    import glob
    import os

    import torch
    from safetensors.torch import load_file

    from branchout.storage.checkpoint import fetch_verified

    target = getattr(torch, dtype)
    weights: dict = {}
    for path in sorted(glob.glob(os.path.join(fetch_verified(model_uri), "*.safetensors"))):
        for name, tensor in load_file(path).items():
            tensor = tensor.to(target) if tensor.is_floating_point() else tensor
            weights[name] = (tensor.view(torch.uint16) if tensor.dtype == torch.bfloat16 else tensor).numpy()
    return weights


def _tensor_of(array, copy: bool):
    """A numpy array of ``shared_base_weights`` as a tensor: a view, or an fp32 private copy."""
    import numpy as np
    import torch

    tensor = torch.from_numpy(array)
    if array.dtype == np.uint16:
        tensor = tensor.view(torch.bfloat16)
    if copy:  # the optimizer's master weights are fp32 whatever the parent was stored in
        tensor = tensor.float() if tensor.dtype != torch.float32 else tensor.clone()
    return tensor


def model_on_weights(job, tokenizer, weights: dict, copy: bool):
    """The parent architecture built on ``weights`` without allocating its own.

    ``copy=False`` makes every parameter a view of the given (read-only, object-store
    backed) arrays, frozen: the memory is shared by every job on the node. ``copy=True``
    gives a private, trainable copy.
    """
    import warnings

    from accelerate import init_empty_weights  # a peft dependency
    from transformers import AutoModelForCausalLM

    config = source_config(job.base_model_uri)  # the parent's own architecture, whatever built it
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary) real
        model = AutoModelForCausalLM.from_config(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable NumPy array": that is the point
        tensors = {k: _tensor_of(v, copy) for k, v in weights.items()}
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"shared weights lack {missing[:3]}")
    if not copy:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


# Shards of at most this size: a reader maps one file at a time, and safetensors serialises
# a shard into one buffer, so the exporting rank needs this much on top of the weights.
MAX_SHARD_SIZE = "5GB"


def export_model(model, tokenizer, model_uri: str, state_dict: dict | None = None,
                 extra: dict | None = None, dtype=None) -> None:
    """Write an HF directory (or a PEFT adapter directory) with the tokenizer, and publish it.

    Weights are written as sharded safetensors that ``from_pretrained`` loads, in the
    dtype they trained in. ``state_dict``: weights gathered from DeepSpeed (16-bit under
    bf16/fp16), written as they are through ``model``'s ``save_pretrained``; ``model`` then
    only supplies config, names and tied weights, so a ZeRO-3 module whose own parameters
    are empty shards is fine. Without it ``model``'s own weights are written, cast to
    ``dtype`` first (the plain engine keeps fp32 master weights; LoRA adapters stay fp32).

    Raises:
        ValueError: ``state_dict`` lacks weights the model has.
    """
    import tempfile

    from branchout.stages.training.ds_files import without_deepspeed
    from branchout.storage.checkpoint import publish_dir

    is_adapter = hasattr(model, "peft_config")
    if state_dict is not None and not is_adapter:
        missing = sorted(set(model.state_dict()) - set(state_dict))
        if missing:
            raise ValueError(f"gathered weights lack {len(missing)} tensor(s), e.g. {missing[:3]}")
    elif dtype is not None and not is_adapter:
        model.to(dtype)  # at the end of a job: in place, halving what it holds
    with tempfile.TemporaryDirectory(prefix="branchout-export-") as tmp:
        with without_deepspeed():  # a DeepSpeed job's process has it imported, and is unchanged
            model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
        tokenizer.save_pretrained(tmp)
        publish_dir(tmp, model_uri, extra=extra)


def import_model(job: ImportJob) -> dict:
    """``pretrain.steps: 0``: the given model becomes the run's base as it is.

    Its files are published under ``job.out_uri`` (with a manifest, like every export), with
    the run's tokenizer beside them, so the fan-out branches from a verified copy inside
    the run whatever happens to the original. Nothing is loaded: files are copied.
    """
    import tempfile
    import time

    from branchout.storage.checkpoint import MANIFEST, fetch_verified, publish_dir

    path, revision, tokenizer_uri, out_uri = job.path, job.revision, job.tokenizer_uri, job.out_uri
    started = time.time()
    if "://" not in path and not os.path.isdir(path):  # a hub id: its files, pinned by revision
        from huggingface_hub import snapshot_download

        source = snapshot_download(path, revision=revision)
    else:
        source = source_dir(path)
    tokenizer = fetch_verified(tokenizer_uri)
    with tempfile.TemporaryDirectory(prefix="branchout-import-") as staging:
        for root, _, names in os.walk(source):
            for name in names:
                rel = os.path.relpath(os.path.join(root, name), source)
                if name != MANIFEST and not rel.startswith("."):
                    os.makedirs(os.path.dirname(os.path.join(staging, rel)), exist_ok=True)
                    os.symlink(os.path.realpath(os.path.join(root, name)), os.path.join(staging, rel))
        for name in os.listdir(tokenizer):  # the run's tokenizer wins over whatever the folder had
            if name != MANIFEST:
                target = os.path.join(staging, name)
                if os.path.lexists(target):
                    os.remove(target)
                os.symlink(os.path.join(tokenizer, name), target)
        publish_dir(staging, out_uri, extra={"imported_from": path, "revision": revision})
    return {"model_uri": out_uri, "imported_from": path, "started": started, "ended": time.time(),
            "first_step": 0}

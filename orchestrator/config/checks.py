"""Cross-field checks of a schema-valid spec: everything pydantic cannot see field by field.

Each check returns problem lines (``field.path: message``); ``cross_check`` gathers them
all so a file is fixed in one pass. Nothing here starts Ray or reads datasets (that is
``orchestrator.config.preflight``).
"""

from __future__ import annotations

import os
from typing import Any

from branchout.core.graph import KINDS, corpora, farm_blockers
from branchout.core.spec import PipelineSpec, TrainingSpec


def cross_check(spec: PipelineSpec) -> list[str]:
    problems: list[str] = _check_credentials(spec)
    if problems:  # nothing below may open (or echo) a URI that carries a secret
        return problems
    problems += _check_training("pretrain", spec.pretrain, spec.pretrain.steps)
    if spec.pretrain.stop is not None and spec.pretrain.schedule.kind != "wsd":
        problems.append("pretrain.stop: an early stop cools down from where it stops, which only "
                        "schedule.kind: wsd does (cosine decays over the whole budget); set pretrain.schedule.kind: wsd")
    if not spec.finetune.domains:
        problems.append("finetune.domains: name at least one domain to fine-tune")
    folded: dict[str, str] = {}
    for i, domain in enumerate(spec.finetune.domains):
        other = folded.setdefault(domain.name.casefold(), domain.name)
        if other != domain.name:  # one directory on a case-insensitive disk, confusable everywhere
            problems.append(f"finetune.domains.{i}.name: {domain.name!r} differs from {other!r} only by case; "
                            "domain names must differ by more")
        if domain.name in RESERVED_NAMES:
            problems.append(f"finetune.domains.{i}.name: {domain.name!r} is reserved (a stage, the base model or "
                            f"the general held-out set: {', '.join(RESERVED_NAMES)}); choose another name")
        problems += _check_training(f"finetune.domains.{i}", domain, domain.steps)
        if domain.replay and domain.dataset.is_instruction:
            problems.append(f"finetune.domains.{i}.replay: the pretraining corpus is plain text and this domain is "
                            "instruction data (its loss is on answers only); replay mixes text into text domains")
        elif domain.replay and spec.domain_seq_len(domain) != spec.pretrain.seq_len:
            problems.append(f"finetune.domains.{i}.replay: it replays the pretraining corpus's blocks of "
                            f"pretrain.seq_len = {spec.pretrain.seq_len} tokens; this domain's seq_len is "
                            f"{spec.domain_seq_len(domain)}")
        if domain.farm is True and farm_blockers(domain):
            problems.append(f"finetune.domains.{i}.farm: true, but this domain cannot train in an adapter farm: "
                            f"{'; '.join(farm_blockers(domain))} (farm: auto trains it alone)")
    problems += _check_model(spec)
    problems += _check_embedded_capacity(spec)
    problems += _check_instruction_data(spec)
    return problems


def _check_instruction_data(spec: PipelineSpec) -> list[str]:
    """Instruction columns make a fine-tune supervised; the pretraining corpus is a token stream."""
    problems = []
    for c in corpora(spec.pretrain):
        column = "messages_column" if c.dataset.messages_column else "prompt_column"
        if c.dataset.is_instruction:
            problems.append(f"{c.where}.{column}: the pretraining corpus is plain text; instruction data "
                            "(prompt/response or messages) belongs to finetune.domains")
    return problems


# Job names are "<kind>/<domain>" and data jobs "data/<dataset>", where the pretraining
# corpus is "data/pretrain" (core.graph); `--rerun` takes kind and domain names alike. The
# cross scores name the base model "base" and the pretraining corpus's held-out set "general".
RESERVED_NAMES = (*KINDS, "base", "general")

_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "hdfs"}


def _check_credentials(spec: PipelineSpec) -> list[str]:
    """URIs that carry credentials are refused: the spec is written to spec.yaml, state.json,
    the registry and logs. The message never repeats the URI."""
    uris = [("storage", spec.storage), ("cluster.address", spec.cluster.address),
            ("tracking.mlflow_uri", spec.tracking.mlflow_uri),
            # a tokenizer read from the model's folder (its default) is said once, as model.path
            ("tokenizer.path", spec.tokenizer.path if spec.tokenizer.path != spec.model.path else None),
            ("model.path", spec.model.path),
            ("evaluate.lm_eval.include_path", spec.evaluate.lm_eval.include_path if spec.evaluate.lm_eval else None)]
    uris += [(f"{c.where}.path", c.dataset.path) for c in corpora(spec.pretrain)]
    uris += [(f"finetune.domains.{i}.dataset.path", d.dataset.path) for i, d in enumerate(spec.finetune.domains)]
    problems = [f"{where}: the URI embeds credentials, which would be written into spec.yaml, state.json, "
                "the registry and logs; give them through the environment (AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS) or an instance role instead"
                for where, uri in uris if uri and has_credentials(uri)]
    free = [("model.config", spec.model.config), ("pretrain.deepspeed.config", spec.pretrain.deepspeed.config),
            ("finetune.defaults.deepspeed.config", spec.finetune.defaults.deepspeed.config)]
    free += [(f"finetune.domains.{i}.deepspeed.config", d.deepspeed.config) for i, d in enumerate(spec.finetune.domains)]
    problems += [f"{path}: a setting named like a secret, which would be written into spec.yaml, the job's "
                 "environment and tracking params; give it through the environment of the workers instead"
                 for where, value in free for path in _secret_settings(where, value)]
    return problems


def requirement_has_credentials(requirement: str) -> bool:
    """A pip requirement (``git+https://user:TOKEN@host/...``, ``pkg @ https://TOKEN@host/...``)
    carrying any userinfo or secret query: a bare user is a token for most git hosts."""
    from urllib.parse import urlsplit

    for word in requirement.replace("@ ", " ").split():
        url = word.split("+", 1)[1] if word.startswith(("git+", "hg+", "svn+", "bzr+")) else word
        if "://" not in url:
            continue
        try:
            parts = urlsplit(url)
            # ssh's user is an account name (git@github.com), not a secret; elsewhere a bare
            # user is how most git hosts take a token
            if (parts.username and parts.scheme != "ssh") or has_credentials(url):
                return True
        except ValueError:
            return True
    return False


def _secret_settings(where: str, value) -> list[str]:
    """Paths of free-form settings (``deepspeed.config``, ``model.config``) named like secrets."""
    from branchout.orchestrator.operate.secrets import secret_key

    if isinstance(value, dict):
        found = []
        for k, v in value.items():
            path = f"{where}.{k}"
            found += [path] if secret_key(k) and v not in (None, "", False) else _secret_settings(path, v)
        return found
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _secret_settings(f"{where}.{i}", v)]
    return []


def has_credentials(uri: str) -> bool:
    """A password (or, for object stores, any user) before the host, or a secret in the query."""
    from urllib.parse import parse_qsl, urlsplit

    if "://" not in uri:
        return False
    try:
        parts = urlsplit(uri)
        password, user = parts.password, parts.username
    except ValueError:
        return True  # unparsable userinfo: treat as secret rather than echo it anywhere
    if password or (user and parts.scheme.lower() in _OBJECT_STORES):
        return True
    from branchout.orchestrator.operate.secrets import secret_key

    # one rule for secret names everywhere (query keys, free-form settings): it knows
    # private_key, api_key and the rest
    return any(secret_key(key) for key, _ in parse_qsl(parts.query))


def _check_training(where: str, t: TrainingSpec, steps: int | None) -> list[str]:
    problems = []
    if getattr(t, "early_stop", None) is not None and t.eval_every is None:
        problems.append(f"{where}.early_stop: it stops on the held-out loss, which only eval_every scores; "
                        "set eval_every too")
    per_step = t.num_workers * t.micro_batch_size
    if t.global_batch_size % per_step:
        problems.append(
            f"{where}.global_batch_size: {t.global_batch_size} is not divisible by "
            f"num_workers × micro_batch_size = {t.num_workers} × {t.micro_batch_size} = {per_step}"
        )
    ds = t.deepspeed
    if ds.zero_stage == "auto":
        pass  # the planner picks stage and offload (orchestrator.config.plan.resolve_auto_zero)
    elif ds.offload_params and ds.zero_stage != 3:
        problems.append(f"{where}.deepspeed.offload_params: needs zero_stage 3 (got {ds.zero_stage})")
    elif ds.offload_optimizer and ds.zero_stage == 0:
        problems.append(f"{where}.deepspeed.offload_optimizer: needs zero_stage 1, 2 or 3 (got 0)")
    r = t.resources_per_worker
    if r.accelerator and r.gpu_memory_gb is None:
        from branchout.cluster.gpu_memory import GPUS

        if r.accelerator not in GPUS:
            problems.append(f"{where}.resources_per_worker.accelerator: unknown GPU {r.accelerator!r}; "
                            f"known: {', '.join(GPUS)} (or set gpu_memory_gb)")
    if ds.precision == "fp16" and not t.resources_per_worker.uses_gpu:
        problems.append(
            f"{where}.deepspeed.precision: fp16 needs a GPU (resources_per_worker.gpu > 0); "
            "use auto, bf16 or fp32 on the CPU"
        )
    problems += _check_passthrough(where, t)
    if steps and t.schedule.warmup_steps >= steps:  # 0 steps: nothing to warm up
        problems.append(
            f"{where}.schedule.warmup_steps: {t.schedule.warmup_steps} must be below steps ({steps})"
        )
    return problems


def spec_config(spec: PipelineSpec):
    """The model's config (from ``model.path``, or type + overrides sized to the tokenizer),
    or a problem line."""
    from branchout.stages.training.model import ModelConfigError, build_config, source_config

    if spec.model.path is not None:
        try:
            config = source_config(spec.model.path, spec.model.revision)
        except ModelConfigError as e:
            return f"model.path: {e}"
        except OSError as e:  # storage unreachable, no permission: the filesystem's own words, one line
            return f"model.path: cannot be read from here: {_one_line(e)}"
        vocab = tokenizer_vocab_size(spec)
        if isinstance(vocab, str):
            return vocab
        if vocab > config.vocab_size:
            return (f"tokenizer.path: its {vocab:,} tokens exceed the {config.vocab_size:,} embeddings of "
                    f"model.path; use the model's own tokenizer")
        return config
    vocab = tokenizer_vocab_size(spec)
    if isinstance(vocab, str):
        return vocab
    try:
        return build_config(spec.model.type, spec.model.config, vocab)
    except ModelConfigError as e:
        return f"model: {e}"
    except (TypeError, ValueError, AttributeError, OverflowError) as e:  # the config class rejected a value
        return f"model.config: {_one_line(e)}"


def _check_model(spec: PipelineSpec) -> list[str]:
    from branchout.stages.training.model import (
        MAX_META_LAYERS,
        default_lora_targets,
        max_positions,
        meta_model,
        missing_lora_targets,
        parameter_counts,
    )

    if spec.pretrain.steps == 0 and spec.model.path is None:
        return ["pretrain.steps: 0 skips pretraining, which needs an existing model to branch from (model.path)"]
    config = spec_config(spec)
    if isinstance(config, str):
        return [config]
    model_type = config.model_type
    problems = []
    limit = max_positions(config)
    if limit is not None:
        if spec.pretrain.seq_len > limit:
            problems.append(f"pretrain.seq_len: {spec.pretrain.seq_len} exceeds the model's {limit} positions")
        for i, d in enumerate(spec.finetune.domains):
            if spec.domain_seq_len(d) > limit:
                problems.append(
                    f"finetune.domains.{i}.seq_len: {spec.domain_seq_len(d)} exceeds the model's {limit} positions"
                )
    try:
        layers = getattr(config, "num_hidden_layers", None)
        model = meta_model(config, min(layers, MAX_META_LAYERS) if isinstance(layers, int) and layers > 0 else None)
        parameter_counts(config)
    except Exception as e:  # transformers raises many types for inconsistent configs
        return problems + [f"model.config: cannot build {model_type}: {_one_line(e)}"]
    ev = spec.evaluate
    if limit is not None and ev.generation_samples and ev.max_new_tokens >= limit:
        problems.append(f"evaluate.max_new_tokens: {ev.max_new_tokens} leaves no room for a prompt in the model's "
                        f"{limit} positions; lower it (or set evaluate.generation_samples: 0)")
    lora_domains = [(i, d) for i, d in enumerate(spec.finetune.domains) if d.method == "lora"]
    if lora_domains:
        for i, d in lora_domains:
            targets = d.lora.target_modules or default_lora_targets(model_type)
            if not targets:
                problems.append(
                    f"finetune.domains.{i}.lora.target_modules: peft has no default for "
                    f"{model_type!r}; name the modules to adapt"
                )
                continue
            missing = missing_lora_targets(model, targets)
            if missing:
                problems.append(
                    f"finetune.domains.{i}.lora.target_modules: {', '.join(missing)} not found in "
                    f"{model_type} (e.g. {_example_linear_names(model)})"
                )
    return problems


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def tokenizer_vocab_size(spec: PipelineSpec) -> int | str:
    """The vocabulary the model will have, or a problem line."""
    if spec.tokenizer.path is None:
        return spec.tokenizer.vocab_size
    from branchout.stages.prepare.tokenizer import TokenizerError, load_tokenizer

    try:
        return len(load_tokenizer(spec.tokenizer.path))
    except TokenizerError as e:
        return f"tokenizer.path: {e}"


def _example_linear_names(model) -> str:
    import torch

    leaf = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    return ", ".join(leaf[:6])


def _check_embedded_capacity(spec: PipelineSpec) -> list[str]:
    """An embedded Ray holds only this machine; a request beyond it would wait forever."""
    if spec.cluster.address is not None or spec.cluster.autoscaling or os.environ.get("RAY_ADDRESS"):
        return []  # a cluster's capacity is checked once connected (orchestrator.run.driver)
    cpus = spec.cluster.num_cpus or os.cpu_count() or 1
    gpus = spec.cluster.num_gpus if spec.cluster.num_gpus is not None else _local_gpus()
    problems = []
    jobs = [("pretrain", spec.pretrain)] + [
        (f"finetune.domains.{i}", d) for i, d in enumerate(spec.finetune.domains)
    ]
    for where, t in jobs:
        r = t.resources_per_worker
        if t.num_workers * r.cpu > cpus:
            problems.append(
                f"{where}.num_workers: {t.num_workers} workers × {r.cpu:g} CPU exceed the "
                f"embedded Ray's {cpus} CPUs (set cluster.address to use a cluster)"
            )
        if t.num_workers * r.gpu > gpus:
            problems.append(
                f"{where}.resources_per_worker.gpu: {t.num_workers} × {r.gpu:g} GPU requested, "
                f"this machine has {gpus}"
            )
    return problems


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # a broken CUDA install counts as no GPU here, not as a crash
        return 0


# Keys of DeepSpeed's config that branchout derives from its own fields: a passthrough
# value that disagrees would either be overwritten, fail on the workers, or (ZeRO stage)
# break the export. Other keys pass through as tuning.
_DERIVED = {
    "train_batch_size": "global_batch_size",
    "train_micro_batch_size_per_gpu": "micro_batch_size",
    "gradient_accumulation_steps": "global_batch_size",
    "gradient_clipping": "optimizer.grad_clip",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "bf16.enabled": "deepspeed.precision",
    "fp16.enabled": "deepspeed.precision",
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": "deepspeed.zero_stage",
}
_OFFLOAD = {"zero_optimization.offload_optimizer": "offload_optimizer",
            "zero_optimization.offload_param": "offload_params"}


def _check_passthrough(where: str, t: TrainingSpec) -> list[str]:
    """``deepspeed.config`` keys that contradict the fields branchout builds the config from."""
    from branchout.stages.training.engine import deepspeed_config

    passthrough = t.deepspeed.config
    if not passthrough:
        return []
    ds = f"{where}.deepspeed.config"
    own = deepspeed_config(t.model_copy(update={"deepspeed": t.deepspeed.model_copy(update={"config": {}})}),
                           t.num_workers, t.resources_per_worker.uses_gpu)
    problems = []
    for key, section in (("optimizer", "optimizer"), ("scheduler", "schedule")):
        if key in passthrough:
            what = "optimizer" if key == "optimizer" else "learning-rate schedule"
            problems.append(f"{ds}.{key}: branchout builds the {what} itself ({where}.{section}); "
                            f"a DeepSpeed {key} here would be ignored, remove it")
    for path, value in _leaves(passthrough):
        if path.split(".")[0] in ("optimizer", "scheduler"):
            continue
        offload = next((o for o in _OFFLOAD if path == o or path.startswith(o + ".")), None)
        if offload:
            enabled = getattr(t.deepspeed, _OFFLOAD[offload])
            if path.endswith(".device") and (value != "none") != enabled:
                problems.append(f"{ds}.{path}: {value!r} contradicts {where}.deepspeed.{_OFFLOAD[offload]} "
                                f"({str(enabled).lower()}); set it there, not in deepspeed.config")
            continue
        field = _DERIVED.get(path)
        if field is None:
            continue
        mine = _lookup(own, path)
        if mine is not None and value != mine:
            shown = _field_value(t, field)
            problems.append(f"{ds}.{path}: {value!r} contradicts {where}.{field} ({shown}); "
                            "set it there, not in deepspeed.config")
    return problems


def _leaves(d: dict[str, Any], prefix: str = ""):
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaves(value, path + ".")
        else:
            yield path, value


def _lookup(d: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _field_value(t: TrainingSpec, field: str) -> Any:
    value: Any = t
    for part in field.split("."):
        value = getattr(value, part)
    return value

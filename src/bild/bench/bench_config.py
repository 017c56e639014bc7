"""The benchmark's YAML config (`BenchConfig`): load, validate with messages that name the bad key, override."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bild.bench.machine import DEVICES, DTYPES, KERNELS
from bild.config import (
    BILD_FIELDS,
    CONTEXT_FIELDS,
    DEFAULT_FALLBACK_CANDIDATES,
    DEFAULT_ROLLBACK_RULE,
    BildSettings,
    is_real,
)
from bild.drafters import QUANTIZATIONS
from bild.policies import ROLLBACK_RULES
from bild.schedule import AUTO

METHOD_NAMES = ("large", "small", "assisted", "bild")
SCHEDULES = ("constant", "heuristic", "heuristic_transient")
METHOD_KEYS = {
    "large": (),
    "small": (),
    "assisted": ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
                 "assistant_ensemble_weight"),  # the last: stock's lossy verification (transformers >= 5.17)
    "bild": (*BILD_FIELDS, *CONTEXT_FIELDS, "large_lean"),  # context drafts; large_lean: false: the verifier's own forward
}
DEFAULT_METHODS = ("large", "small", "assisted", "bild")
DRAFTER_KEYS = ("model", "early_exit", "adapter", "quantization", "vocab_size", "group_size", "compile", "lean")  # see bench/loading.py
ENSEMBLE_WEIGHT = "assistant_ensemble_weight"
ENSEMBLE_VERSION = "5.17"  # `assistant_ensemble_weight` (static ensemble verification) is there from 5.17 (checked)


@dataclass(frozen=True)
class MethodSpec:
    """One decoding method to benchmark: its kind (``METHOD_NAMES``), settings and display label."""

    name: str
    params: dict = field(default_factory=dict)
    label: str = ""
    drafter: str | None = None  # a name from the config's `drafters`; None: the plain small model

    def __post_init__(self):
        if not self.label:
            suffix = f" [{self.drafter}]" if self.drafter else ""
            object.__setattr__(self, "label", default_label(self.name, self.params) + suffix)


@dataclass(frozen=True)
class BenchConfig:
    """Everything `bild bench` needs; see the comment block at the top of ``configs/*.yaml``."""

    task: str
    small: str
    large: str
    data: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 1
    max_new_tokens: int = 64
    chat: bool = False
    prefix: str | None = None
    limit: int | None = None
    skip: int = 0  # examples passed over before the first one used (calibration uses a later slice)
    threads: int | None = None
    kernels: str = "fit"  # linear-layer kernels of every model: fit (timed fastest here, bild.fit_kernels) | stock | fp16
    stop_strings: tuple[str, ...] = ()
    # sampling: every method draws with these settings, once per seed (greedy: one run, seeds unused)
    do_sample: bool = False
    temperature: float | None = None  # None: 1.0 (no scaling)
    top_p: float | None = None
    top_k: int | None = None
    seeds: tuple[int, ...] = (0,)
    drafters: dict = field(default_factory=dict)  # name -> {model, quantization, vocab_size, group_size}
    methods: tuple[MethodSpec, ...] = ()

    @property
    def sampling(self) -> dict | None:
        """The sampling settings passed to every generate() call, or None for greedy decoding."""
        if not self.do_sample:
            return None
        given = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
        return {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                **{key: value for key, value in given.items() if value is not None}}  # fmt: skip

    def decoding(self) -> str:
        """``greedy`` or ``sampling (temperature 0.7, top_p 0.9), seeds 0, 1, 2``."""
        if not self.do_sample:
            return "greedy"
        given = [f"{key} {getattr(self, key):g}" for key in ("temperature", "top_p", "top_k")
                 if getattr(self, key) is not None]  # fmt: skip
        settings = f" ({', '.join(given)})" if given else ""
        return f"sampling{settings}, seed{'s' if len(self.seeds) > 1 else ''} {', '.join(map(str, self.seeds))}"

    def replace(self, **overrides: Any) -> BenchConfig:
        """A copy with the non-None ``overrides`` applied and validated (command-line options)."""
        values = {k: v for k, v in overrides.items() if v is not None}
        return parse_config({**self.to_dict(), **values}, source="command line")

    def to_dict(self) -> dict:
        """Plain data, as it would be written in YAML (methods as dicts)."""
        values = dataclasses.asdict(self)
        values["methods"] = [
            {"name": m.name, **m.params, "label": m.label, **({"drafter": m.drafter} if m.drafter else {})}
            for m in self.methods
        ]
        values["stop_strings"] = list(self.stop_strings)
        values["seeds"] = list(self.seeds)
        return values


def load_config(path: str | Path) -> BenchConfig:
    """Read and validate a benchmark YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Config file {str(path)!r} does not exist; see configs/*.yaml for examples.")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {err}") from err
    return parse_config(raw, source=str(path))


def parse_config(raw: Any, source: str = "config") -> BenchConfig:
    """Validate a mapping of config keys and build a `BenchConfig`; ValueError names the bad key."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a mapping of keys to values, got {type(raw).__name__}.")
    allowed = [f.name for f in dataclasses.fields(BenchConfig)]
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; allowed keys: {allowed}.")
    for key in ("task", "small", "large"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ValueError(
                f"{source}: `{key}` is required and must be a non-empty string, got {raw.get(key)!r}."
            )
    values = dict(raw)
    _check_choice(source, "device", values.get("device", "auto"), DEVICES, allow_prefix="cuda:")
    _check_choice(source, "dtype", values.get("dtype", "auto"), DTYPES)
    _check_choice(source, "kernels", values.get("kernels", "fit"), KERNELS)
    for key in ("batch_size", "max_new_tokens"):
        values[key] = _positive_int(source, key, values.get(key, getattr(BenchConfig, key)))
    for key in ("limit", "threads"):
        if values.get(key) is not None:
            values[key] = _positive_int(source, key, values[key])
    skip = values.get("skip", 0)
    if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
        raise ValueError(f"{source}: `skip` must be a number of examples >= 0, got {skip!r}.")
    if not isinstance(values.get("chat", False), bool):
        raise ValueError(f"{source}: `chat` must be true or false, got {values['chat']!r}.")
    for key in ("data", "prefix"):
        if values.get(key) is not None and not isinstance(values[key], str):
            raise ValueError(f"{source}: `{key}` must be a string or left out, got {values[key]!r}.")
    values["stop_strings"] = _string_list(source, "stop_strings", values.get("stop_strings") or [])
    values.update(_check_sampling(values, source))
    values["drafters"] = parse_drafters(values.get("drafters") or {}, source)
    values["methods"] = parse_methods(values.get("methods", list(DEFAULT_METHODS)), source)
    unknown = sorted({m.drafter for m in values["methods"] if m.drafter and m.drafter not in values["drafters"]})
    if unknown:
        raise ValueError(f"{source}: methods name drafter(s) {unknown} that `drafters` does not define.")
    return BenchConfig(**values)


def parse_drafters(raw: Any, source: str) -> dict:
    """``{name: {model: <folder or hub id> | early_exit: k, adapter: <folder>, quantization: auto|int8|int4|int8-dynamic|null,
    vocab_size: N|auto|null, group_size: G, compile: true|false, lean: true|false}}``, validated."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: `drafters` must map names to drafter settings, got {raw!r}.")
    drafters = {}
    for name, entry in raw.items():
        entry = {} if entry is None else entry
        unknown = sorted(set(entry) - set(DRAFTER_KEYS)) if isinstance(entry, dict) else None
        if not isinstance(name, str) or unknown is None or unknown:
            raise ValueError(f"{source}: drafter {name!r} must be a mapping with keys from {list(DRAFTER_KEYS)}, "
                             f"got {entry!r}.")  # fmt: skip
        if entry.get("quantization") not in QUANTIZATIONS:
            raise ValueError(f"{source}: drafter {name!r}: `quantization` must be one of {list(QUANTIZATIONS)}.")
        for key in ("vocab_size", "early_exit", "group_size"):
            if entry.get(key) is not None and not (key == "vocab_size" and entry[key] == "auto"):
                _positive_int(source, f"drafters.{name}.{key}", entry[key])
        for key in ("compile", "lean"):
            if not isinstance(entry.get(key, False), bool):
                raise ValueError(f"{source}: drafter {name!r}: `{key}` must be true or false, got {entry[key]!r}.")
        if entry.get("compile") and entry.get("lean") is False:
            raise ValueError(f"{source}: drafter {name!r}: `compile: true` compiles the lean forward; drop `lean: false`.")
        if entry.get("early_exit") and entry.get("model"):
            raise ValueError(f"{source}: drafter {name!r}: `early_exit` drafts with the large model's layers; drop `model`.")
        drafters[name] = dict(entry)
    return drafters


def parse_methods(raw: Any, source: str = "config") -> tuple[MethodSpec, ...]:
    """Method entries: a name (``large``) or a mapping ``{name: bild, fallback_threshold: 0.6, ...}``."""
    if isinstance(raw, MethodSpec):
        return (raw,)
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ValueError(
            f"{source}: `methods` must be a non-empty list of method names or mappings, got {raw!r}."
        )
    specs = tuple(m if isinstance(m, MethodSpec) else parse_method(m, source) for m in raw)
    labels = [spec.label for spec in specs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"{source}: methods {duplicates} appear twice; give each a distinct `label`.")
    return specs


def parse_method(raw: Any, source: str = "config") -> MethodSpec:
    """One method entry, validated."""
    entry = {"name": raw} if isinstance(raw, str) else raw
    if not isinstance(entry, dict) or entry.get("name") not in METHOD_NAMES:
        name = entry.get("name") if isinstance(entry, dict) else entry
        raise ValueError(
            f"{source}: unknown method {name!r} in `methods`; allowed names: {list(METHOD_NAMES)}."
        )
    name = entry["name"]
    params = {k: v for k, v in entry.items() if k not in ("name", "label", "drafter")}
    unknown = sorted(set(params) - set(METHOD_KEYS[name]))
    if unknown:
        raise ValueError(
            f"{source}: unknown key(s) {unknown} for method {name!r}; allowed keys: "
            f"{['name', 'label', *METHOD_KEYS[name]]}."
        )
    label = entry.get("label") or ""
    if not isinstance(label, str):
        raise ValueError(f"{source}: `label` of method {name!r} must be a string, got {label!r}.")
    check = _check_bild if name == "bild" else _check_assisted if name == "assisted" else None
    drafter = entry.get("drafter")
    if drafter is not None and (name == "large" or not isinstance(drafter, str)):
        raise ValueError(f"{source}: `drafter` is a drafter name for small, assisted or bild methods, got {drafter!r}.")
    return MethodSpec(name, check(params, source) if check else {}, label, drafter)


def _check_bild(params: dict, source: str) -> dict:
    """All BiLD settings, the missing ones at the core defaults, validated by the core's own rules; and
    ``large_lean: false`` (run the large model by its own forward: `bild.lean.own_forward`), kept only when set."""
    params = dict(params)
    large_lean = params.pop("large_lean", True)
    if not isinstance(large_lean, bool):
        raise ValueError(f"{source}: bild method: `large_lean` must be true or false, got {large_lean!r}.")
    values = {name: parse_float(value) if name == "rollback_threshold" else value for name, value in params.items()}
    try:
        settings = dataclasses.asdict(BildSettings(**values))
    except ValueError as err:
        raise ValueError(f"{source}: bild method: {err}") from err
    # unset context fields are left out, and the paper's rollback rule (so methods keep the keys that journals
    # written before the rule was a setting hold)
    settings = {name: v for name, v in settings.items()
                if not (name in CONTEXT_FIELDS and v is None or name == "rollback_rule" and v == DEFAULT_ROLLBACK_RULE)}  # fmt: skip
    return settings if large_lean else {**settings, "large_lean": False}


def other_rollback_rule(params: dict) -> str | None:
    """A BiLD method's rollback rule where it is not the paper's (the default), else None."""
    rule = params.get("rollback_rule", DEFAULT_ROLLBACK_RULE)
    return None if rule == DEFAULT_ROLLBACK_RULE else rule


def _check_sampling(values: dict, source: str) -> dict:
    """``do_sample``, ``temperature``, ``top_p``, ``top_k`` and ``seeds``, validated."""
    do_sample = values.get("do_sample", False)
    if not isinstance(do_sample, bool):
        raise ValueError(f"{source}: `do_sample` must be true or false, got {do_sample!r}.")
    checked = {"do_sample": do_sample}
    for key, low, high in (("temperature", 0.0, math.inf), ("top_p", 0.0, 1.0)):
        value = values.get(key)
        if value is not None and (not is_real(value) or not low < value <= high):
            raise ValueError(f"{source}: `{key}` must be a number in ({low:g}, {high:g}], got {value!r}.")
        checked[key] = None if value is None else float(value)
    if values.get("top_k") is not None:
        checked["top_k"] = _positive_int(source, "top_k", values["top_k"])
    seeds = values.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
    if (not isinstance(seeds, (list, tuple)) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):  # fmt: skip
        raise ValueError(f"{source}: `seeds` must be a list of distinct integers >= 0, got {seeds!r}.")
    if len(seeds) > 1 and not do_sample:
        raise ValueError(f"{source}: several `seeds` ({list(seeds)}) only make sense with `do_sample: true`; "
                         "greedy decoding gives the same output for every seed.")  # fmt: skip
    sampled = [key for key in ("temperature", "top_p", "top_k") if checked.get(key) is not None]
    if sampled and not do_sample:
        raise ValueError(f"{source}: {sampled} set without `do_sample: true`; greedy decoding ignores them.")
    checked["seeds"] = tuple(seeds)
    return checked


def _check_assisted(params: dict, source: str) -> dict:
    checked = {}
    if "num_assistant_tokens" in params:
        checked["num_assistant_tokens"] = _positive_int(
            source, "num_assistant_tokens", params["num_assistant_tokens"]
        )
    if "num_assistant_tokens_schedule" in params:
        _check_choice(
            source, "num_assistant_tokens_schedule", params["num_assistant_tokens_schedule"], SCHEDULES
        )
        checked["num_assistant_tokens_schedule"] = params["num_assistant_tokens_schedule"]
    if "assistant_confidence_threshold" in params:
        value = params["assistant_confidence_threshold"]
        if not is_real(value) or not 0.0 <= value <= 1.0:
            raise ValueError(
                f"{source}: assisted `assistant_confidence_threshold` must be a number in [0, 1] (0 turns it off), "
                f"got {value!r}."
            )
        checked["assistant_confidence_threshold"] = float(value)
    if ENSEMBLE_WEIGHT in params:
        checked[ENSEMBLE_WEIGHT] = check_ensemble_weight(params[ENSEMBLE_WEIGHT], f"{source}: assisted")
    return checked


def check_ensemble_weight(value: Any, what: str) -> float:
    """An `assistant_ensemble_weight` in (0, 1], as a float; 1 is lossless (the large model's own verification)."""
    if not is_real(value) or not 0.0 < value <= 1.0:
        raise ValueError(
            f"{what} `{ENSEMBLE_WEIGHT}` must be a number in (0, 1] (stock's lossy verification accepts drafts "
            f"against w * p_large + (1 - w) * q_small; 1: lossless), got {value!r}."
        )
    return float(value)


def default_label(name: str, params: dict) -> str:
    """``bild(0.6, 2, 10)`` (fallback, rollback, max drafts; candidates at the default "auto" unless marked:
    ``+c0``: the paper's rule, the unsure token dropped; ``+v``: the unsure token alone is checked; ``+c3``: it and
    its 2 next-best siblings; ``+pl3``: up to 3 context drafts a round, ``+pl0``: none; unmarked: the default;
    ``+margin``: the margin rollback rule; ``+own-large``: the large model by its own forward),
    ``assisted(n=5, constant, c=0.4)``, ``assisted w=0.5`` (stock's ensemble weight), or the name."""
    if name == "bild" and params:
        k = params.get("fallback_candidates", DEFAULT_FALLBACK_CANDIDATES)
        checked = ""
        if k != AUTO:
            k = max(k, int(bool(params.get("verify_fallback_token"))))
            checked = "+v" if k == 1 else f"+c{k}"
        if params.get("prompt_lookup_num_tokens") is not None:  # context drafts: +pl<k>, /<n> for a non-default n-gram
            ngram = params.get("max_matching_ngram_size")
            checked += f"+pl{params['prompt_lookup_num_tokens']}" + (f"/{ngram}" if ngram else "")
        if other_rollback_rule(params):
            checked += f"+{params['rollback_rule']}"
        if params.get("large_lean") is False:
            checked += "+own-large"
        return f"bild({params['fallback_threshold']:g}, {params['rollback_threshold']:g}, {params['max_draft_tokens']}{checked})"
    if name == "assisted" and params:
        parts = []
        if "num_assistant_tokens" in params:
            parts.append(f"n={params['num_assistant_tokens']}")
        if "num_assistant_tokens_schedule" in params:
            parts.append(params["num_assistant_tokens_schedule"])
        if "assistant_confidence_threshold" in params:
            parts.append(f"c={params['assistant_confidence_threshold']:g}")
        weight = f" w={params[ENSEMBLE_WEIGHT]:g}" if ENSEMBLE_WEIGHT in params else ""
        return (f"assisted({', '.join(parts)})" if parts else "assisted") + weight
    return name


def parse_float(value: Any) -> Any:
    """Numbers pass through; the strings ``inf``/``.inf``/``infinity`` (any case) become ``math.inf``."""
    if isinstance(value, str) and value.strip().lower().lstrip("+.") in ("inf", "infinity"):
        return math.inf
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_float_list(text: str, what: str) -> list[float]:
    """``"0.3,0.5,inf"`` -> ``[0.3, 0.5, inf]``; ValueError naming ``what`` on a bad item."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    values = [parse_float(item) for item in items]
    bad = [item for item, value in zip(items, values, strict=True) if not is_real(value)]
    if bad or not values:
        raise ValueError(f"{what}: expected comma-separated numbers (inf allowed), got {text!r}.")
    return values


def parse_rollback_rules(text: str) -> list[str]:
    """``"nll,margin"`` -> ``["nll", "margin"]``; ValueError naming the rules on anything else."""
    rules = [item.strip() for item in text.split(",") if item.strip()]
    if not rules or any(rule not in ROLLBACK_RULES for rule in rules):
        raise ValueError(f"--rollback-rule takes rules from {', '.join(ROLLBACK_RULES)}, comma-separated; got {text!r}.")
    return rules


def _positive_int(source: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{source}: `{key}` must be a positive integer, got {value!r}.")
    return value


def _string_list(source: str, key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{source}: `{key}` must be a list of non-empty strings, got {value!r}.")
    return tuple(value)


def _check_choice(source: str, key: str, value: Any, allowed: tuple, allow_prefix: str | None = None) -> None:
    if value in allowed or (allow_prefix and isinstance(value, str) and value.startswith(allow_prefix)):
        return
    raise ValueError(f"{source}: `{key}` must be one of {list(allowed)}, got {value!r}.")

"""The benchmark registry: one YAML file per bench in `benchmarks/specs/`, loaded into a dict.

A spec is data (name, version, dataset source, field mapping, prompt template, default
sampling, scorer, metrics), validated here; unknown keys, duplicate names and unknown scorer
or metric names raise. `get_bench(name)` raises `BenchmarkNotFoundError` listing what exists
and the closest name. Bump `version` whenever data normalisation, prompt or scoring changes;
the version is recorded in every results.json.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from opdcli.errors import BenchmarkNotFoundError, ConfigError

SPEC_DIR = Path(__file__).parent / "specs"
KINDS = ("math", "mcq", "code", "toy")
SCORERS = ("math", "mcq", "code", "toy")
METRICS = ("avg@k", "pass@k", "maj@k", "no_answer_rate", "truncation_rate", "mean_output_tokens")
_DATASET_KEYS = {"hub", "config", "split", "revision", "rows", "sha256", "generator"}


@dataclass(frozen=True)
class BenchSpec:
    """One benchmark, as described by its YAML file."""

    name: str
    version: int
    kind: str
    dataset: dict[str, Any]
    prompt: str
    scorer: str
    description: str = ""
    fields: dict[str, Any] = field(default_factory=dict)
    system: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    metrics: tuple[str, ...] = METRICS
    pass_k: tuple[int, ...] = (1,)
    options: dict[str, Any] = field(default_factory=dict)
    shuffle_seed: int = 0
    path: str = ""

    @property
    def is_local(self) -> bool:
        """True for benches generated locally (no download, no cache)."""
        return "generator" in self.dataset

    def expected_rows(self, options: dict[str, Any] | None = None) -> int | None:
        rows = self.dataset.get("rows")
        if isinstance(rows, dict):
            return rows.get(str((options or {}).get("release")))
        return rows


def _parse(raw: Any, path: Path) -> BenchSpec:
    where = f"bench spec {path}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    known = set(BenchSpec.__dataclass_fields__) - {"path"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for key in ("name", "version", "kind", "dataset", "prompt", "scorer"):
        if key not in raw:
            raise ConfigError(f"{where}: missing required key '{key}'")
    if raw["kind"] not in KINDS:
        raise ConfigError(f"{where}: kind '{raw['kind']}' is not one of {', '.join(KINDS)}")
    if raw["scorer"] not in SCORERS:
        raise ConfigError(f"{where}: scorer '{raw['scorer']}' is not one of {', '.join(SCORERS)}")
    bad_ds = sorted(set(raw["dataset"]) - _DATASET_KEYS)
    if bad_ds:
        raise ConfigError(f"{where}: unknown dataset key(s) {', '.join(bad_ds)}")
    if "hub" not in raw["dataset"] and "generator" not in raw["dataset"]:
        raise ConfigError(f"{where}: dataset needs 'hub' (a Hub repo) or 'generator' (local)")
    revision = raw["dataset"].get("revision")
    if revision is not None and not re.fullmatch(r"[0-9a-f]{40}", str(revision)):
        raise ConfigError(f"{where}: dataset.revision '{revision}' is not a commit sha; pin the full "
                          "40-character Hub commit (or null to resolve and record it at fetch time)")
    metrics = tuple(raw.get("metrics", METRICS))
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ConfigError(f"{where}: unknown metric(s) {', '.join(bad)}; known: {', '.join(METRICS)}")
    values = dict(raw, metrics=metrics, pass_k=tuple(int(k) for k in raw.get("pass_k", (1,))),
                  version=int(raw["version"]), path=str(path))
    return BenchSpec(**values)


def load_specs(spec_dir: Path = SPEC_DIR) -> dict[str, BenchSpec]:
    """Every `*.yaml` under `spec_dir`, keyed by name; a repeated name raises."""
    specs: dict[str, BenchSpec] = {}
    for path in sorted(Path(spec_dir).glob("*.yaml")):
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"bench spec {path}: not valid YAML ({exc})") from None
        register(_parse(raw, path), specs)
    return specs


def register(spec: BenchSpec, registry: dict[str, BenchSpec]) -> BenchSpec:
    """Add `spec` to `registry`; a name that is already there raises instead of overwriting."""
    if spec.name in registry:
        raise ConfigError(
            f"duplicate benchmark name '{spec.name}' in {spec.path} (already defined in "
            f"{registry[spec.name].path}); rename one of them"
        )
    registry[spec.name] = spec
    return spec


BENCHMARKS: dict[str, BenchSpec] = load_specs()


def closest(name: str, names: list[str]) -> str | None:
    match = difflib.get_close_matches(name, names, n=1, cutoff=0.0)
    return match[0] if match else None


def get_bench(name: str, registry: dict[str, BenchSpec] | None = None) -> BenchSpec:
    """The spec called `name`, or `BenchmarkNotFoundError` naming the closest bench."""
    registry = BENCHMARKS if registry is None else registry
    if name in registry:
        return registry[name]
    names = sorted(registry)
    guess = closest(name, names)
    hint = f"did you mean '{guess}'? " if guess else ""
    raise BenchmarkNotFoundError(
        f"unknown benchmark '{name}'; {hint}available: {', '.join(names)} (see opd eval --list)"
    )

"""Benchmark data: upstream rows -> our normalised JSONL, cached with a manifest.

Sources, in order: `--data FILE` (a local .jsonl/.json/.parquet file in the upstream row
format), the cache (`$OPD_CACHE/benchmarks`, default `~/.cache/opd/benchmarks`), or the Hub via
`datasets` (imported lazily; LiveCodeBench's raw shards through huggingface_hub);
`opd eval fetch --bench X` does only this step. Every normalised row has an `id`; math rows add
`problem`/`answer`, multiple-choice rows `question`/`choices`/`answer` (a letter)/
`shuffle_seed`, code rows the fields of `benchmarks.lcb.normalise_row`. The cache manifest
records the row count and the sha256 of the normalised JSONL; both are checked on every load.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import lcb
from benchmarks.registry import BenchSpec
from opdcli.errors import ConfigError, DataError

LETTERS = "ABCDEFGHIJ"


@dataclass
class BenchData:
    """Normalised rows plus where they came from (recorded in results.json)."""

    rows: list[dict[str, Any]]
    sha256: str
    source: dict[str, Any] = field(default_factory=dict)


def cache_root() -> Path:
    base = os.environ.get("OPD_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "opd") / "benchmarks"


def cache_dir(spec: BenchSpec, options: dict[str, Any]) -> Path:
    key = f"v{spec.version}" + (f"-{options['release']}" if options.get("release") else "")
    return cache_root() / spec.name / key


def jsonl_bytes(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def sha256_rows(rows: list[dict[str, Any]]) -> str:
    return hashlib.sha256(jsonl_bytes(rows)).hexdigest()


def _get(row: dict[str, Any], key: str, where: str) -> Any:
    if key not in row:
        raise DataError(f"{where}: missing field '{key}' (fields: {', '.join(map(str, row))}); "
                        "is this file in the upstream row format of the bench?")
    return row[key]


def _answer_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _math_row(spec: BenchSpec, row: dict[str, Any], i: int) -> dict[str, Any]:
    f, where = spec.fields, f"{spec.name} row {i}"
    pid = row.get(f.get("id", "id"), i)
    return {"id": str(pid), "problem": str(_get(row, f["problem"], where)),
            "answer": _answer_text(_get(row, f["answer"], where))}


def row_seed(base: int, pid: str) -> int:
    """Per-question shuffle seed derived from the spec's seed and the row id."""
    return int(hashlib.sha256(f"{base}:{pid}".encode()).hexdigest()[:8], 16)


def _mcq_row(spec: BenchSpec, row: dict[str, Any], i: int, seed: int) -> dict[str, Any]:
    f, where = spec.fields, f"{spec.name} row {i}"
    pid = str(row.get(f.get("id", "id"), i))
    correct = str(_get(row, f["correct"], where)).strip()
    options = [correct] + [str(_get(row, k, where)).strip() for k in f["incorrect"]]
    s = row_seed(seed, pid)
    order = list(range(len(options)))
    random.Random(s).shuffle(order)
    choices = [options[j] for j in order]
    return {"id": pid, "question": str(_get(row, f["question"], where)).strip(), "choices": choices,
            "answer": LETTERS[order.index(0)], "shuffle_seed": s}


def normalise(spec: BenchSpec, raw: list[dict[str, Any]], shuffle_seed: int | None = None) -> list[dict[str, Any]]:
    """Upstream rows -> our rows (kind-specific); ids must be unique."""
    seed = spec.shuffle_seed if shuffle_seed is None else shuffle_seed
    if spec.kind == "math":
        rows = [_math_row(spec, r, i) for i, r in enumerate(raw)]
    elif spec.kind == "mcq":
        rows = [_mcq_row(spec, r, i, seed) for i, r in enumerate(raw)]
    elif spec.kind == "code":
        rows = [lcb.normalise_row(r, i) for i, r in enumerate(raw)]
    else:
        rows = [dict(r) for r in raw]
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = sorted({x for x in ids if ids.count(x) > 1})[:5]
        raise DataError(f"{spec.name}: duplicate problem ids {', '.join(dup)}")
    return rows


def toy_rows(size: int) -> list[dict[str, Any]]:
    """The toy held-out split (opdcli.data.heldout_prompts) as our rows."""
    from opdcli.config import DataConfig
    from opdcli.data import heldout_prompts

    prompts = heldout_prompts(DataConfig(), size) or []
    return [{"id": p.prompt_id, "problem": p.messages[-1]["content"], "answer": p.answer} for p in prompts]


def check_options(spec: BenchSpec, options: dict[str, Any], data_file: str | None) -> dict[str, Any]:
    """Bench options (LiveCodeBench: release, start_date, end_date) merged over the spec's defaults."""
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - set(spec.options))
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise ConfigError(f"{flags} cannot be used with bench '{spec.name}' (it has no such option)")
    if data_file and "release" in given:
        raise ConfigError("--release selects Hub shards; it has no effect with --data FILE: drop one of them")
    for key in ("start_date", "end_date"):
        if given.get(key):
            try:
                dt.date.fromisoformat(str(given[key]))
            except ValueError:
                raise ConfigError(f"--{key.replace('_', '-')} '{given[key]}' is not a date; use YYYY-MM-DD") from None
    return {**spec.options, **given}


def load(spec: BenchSpec, options: dict[str, Any] | None = None, data_file: str | None = None,
         limit: int | None = None) -> BenchData:
    """Rows of `spec`: generated (toy), from `data_file`, from the cache, or fetched."""
    options = check_options(spec, options or {}, data_file)
    if spec.is_local and data_file:
        raise ConfigError(f"bench '{spec.name}' is generated locally; --data has no effect: drop it")
    if spec.is_local:
        rows = toy_rows(int(spec.dataset.get("rows", 512)))
        source = {"generator": spec.dataset["generator"]}
    elif data_file:
        from opdcli.data import read_rows

        try:
            rows = normalise(spec, read_rows(data_file, "test"))
        except DataError as exc:
            if str(data_file) in str(exc):
                raise
            raise DataError(f"{data_file}: {exc}") from None
        raw_sha = hashlib.sha256(Path(data_file).expanduser().read_bytes()).hexdigest()
        source = {"file": str(Path(data_file).expanduser().resolve()), "file_sha256": raw_sha}
    else:
        rows, manifest = load_cached(spec, options)
        source = {"cache": str(cache_dir(spec, options)), **manifest}
    sha, total = sha256_rows(rows), len(rows)
    if spec.kind == "code":
        rows = [r for r in rows if lcb.in_window(r, options.get("start_date"), options.get("end_date"))]
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise DataError(f"{spec.name}: no problems left (check --limit / --start-date / --end-date)")
    return BenchData(rows, sha, {**source, "options": options, "rows_total": total, "rows_used": len(rows)})


def load_cached(spec: BenchSpec, options: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    folder = cache_dir(spec, options)
    if not (folder / "manifest.json").is_file():
        fetch(spec, options)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    blob = (folder / "data.jsonl").read_bytes()
    if hashlib.sha256(blob).hexdigest() != manifest["sha256"]:
        raise DataError(f"{folder}/data.jsonl does not match its manifest sha256; "
                        f"delete {folder} and run `opd eval fetch --bench {spec.name}` again")
    rows = [json.loads(line) for line in blob.decode("utf-8").splitlines() if line.strip()]
    if len(rows) != manifest["rows"]:
        raise DataError(f"{folder}/data.jsonl has {len(rows)} rows, its manifest says {manifest['rows']}")
    return rows, manifest


def _hub_error(spec: BenchSpec, exc: BaseException) -> DataError:
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return DataError(
        f"cannot download bench '{spec.name}' from the Hub ({spec.dataset['hub']}): {type(exc).__name__}: "
        f"{first}; check the network and Hub login, or pass --data FILE with the upstream rows"
    )


def _resolve_revision(spec: BenchSpec, revision: str | None) -> str | None:
    """The commit sha to download; one quick request, so that no network fails fast."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise DataError("downloading benchmarks needs the 'datasets' package: pip install datasets") from None
    try:
        return HfApi().dataset_info(spec.dataset["hub"], revision=revision).sha
    except Exception as exc:  # offline, unknown repo, bad revision: one message
        raise _hub_error(spec, exc) from None


def _download_shards(spec: BenchSpec, options: dict[str, Any], revision: str | None) -> list[dict[str, Any]]:
    """LiveCodeBench: its Hub repo is a loading script (refused by datasets>=4), so read raw shards."""
    from huggingface_hub import hf_hub_download

    rows: list[dict[str, Any]] = []
    for shard in lcb.shard_files(options["release"]):
        path = hf_hub_download(spec.dataset["hub"], shard, repo_type="dataset", revision=revision)
        with open(path, encoding="utf-8") as fh:
            rows.extend(json.loads(line) for line in fh if line.strip())
    return rows


def _download(spec: BenchSpec, options: dict[str, Any], revision: str | None) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError("downloading benchmarks needs the 'datasets' package: pip install datasets") from None
    ds_cfg = spec.dataset
    try:
        if spec.kind == "code":
            return _download_shards(spec, options, revision)
        ds = datasets.load_dataset(ds_cfg["hub"], ds_cfg.get("config"), split=ds_cfg.get("split", "test"),
                                   revision=revision)
    except DataError:
        raise
    except Exception as exc:  # network, gating, missing split: one message
        raise _hub_error(spec, exc) from None
    return [dict(r) for r in ds]


def fetch(spec: BenchSpec, options: dict[str, Any] | None = None) -> Path:
    """Download, normalise, check and cache one bench; returns the cache folder."""
    if spec.is_local:
        raise ConfigError(f"bench '{spec.name}' is generated locally; there is nothing to fetch")
    options = {**spec.options, **(options or {})}
    requested = spec.dataset.get("revision")
    revision = _resolve_revision(spec, requested)
    rows = normalise(spec, _download(spec, options, revision))
    expected = spec.expected_rows(options)
    if expected is not None and len(rows) != expected:
        raise DataError(f"{spec.name}: downloaded {len(rows)} rows, the spec expects {expected}; "
                        "the upstream data changed: pin dataset.revision in the spec")
    blob, sha = jsonl_bytes(rows), sha256_rows(rows)
    if spec.dataset.get("sha256") and spec.dataset["sha256"] != sha:
        raise DataError(f"{spec.name}: normalised data sha256 {sha} differs from the spec's {spec.dataset['sha256']}")
    if not requested:
        warnings.warn(f"bench '{spec.name}' has no pinned dataset.revision; recorded the resolved "
                      f"revision {revision} in the manifest (pin it in {spec.path})", stacklevel=2)
    folder = cache_dir(spec, options)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").write_bytes(blob)
    manifest = {"bench": spec.name, "version": spec.version, "hub": spec.dataset["hub"],
                "config": spec.dataset.get("config"), "split": spec.dataset.get("split"),
                "revision_requested": requested, "revision": revision, "options": options,
                "rows": len(rows), "sha256": sha, "fetched_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return folder

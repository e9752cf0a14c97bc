"""Rewrite the SAEBench-layout files of finished run folders in the current layout, from what the
folders already hold: no model, no SAE weights, no rerun.

    python tools/saebench_files.py                      # every folder under run_* with an unlearning.json
    python tools/saebench_files.py run_1/seed_0 ...     # these folders

Per folder (a seed folder, or a one-seed run):
- unlearning.json: the same score, details and sweep points under SAEBench's header fields;
- sparse_probing.json: the same accuracies, one detail record per task;
- core.json: SAEBench's core eval from final_info.json's "sae" entry. Measures a run folder does not
  hold (KL with the SAE spliced in, cosine similarity, norms, L1, per-latent densities and weight
  statistics in runs older than core.json) are written -1, SAEBench's value for a metric it could not
  compute, and listed in eval_result_unstructured.not_measured.
The eval_id and datetime of an existing file are kept: they say when the evaluation ran.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import experiment as ex  # noqa: E402


def run_folders(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("run_*/**/unlearning.json"))


def probing_result(old: dict) -> dict:
    """sparse_probing()'s {means, stderrs, details} from a sparse_probing.json of either layout."""
    m = old["eval_result_metrics"]
    details = old["eval_result_details"]
    if isinstance(details, list):  # the current layout
        details = {d["dataset_name"]: {k: v for k, v in d.items() if k != "dataset_name"} for d in details}
        stderrs = old["eval_result_unstructured"]["stderrs_over_tasks"]
    else:
        stderrs = old["eval_result_stderrs"]
    return {"means": m["llm"] | m["sae"], "stderrs": stderrs, "details": details}


def keep_when(new: dict, old: dict | None) -> dict:
    if old is not None:
        new.update(eval_id=old.get("eval_id", new["eval_id"]),
                   datetime_epoch_millis=old.get("datetime_epoch_millis", new["datetime_epoch_millis"]))
    return new


def rewrite(folder: Path, root: Path) -> str:
    read = lambda name: ex.read_json(folder / name, name)
    for name in ("config.json", "cfg.json", "final_info.json", "unlearning.json", "sparse_probing.json"):
        if not (folder / name).is_file():
            raise ex.UsageError(f"{folder}: no {name}")
    try:
        rel = str(folder.resolve().relative_to(root))
    except ValueError:
        rel = str(folder)
    run_cfg = read("config.json") | {"out_dir": rel}  # the folder as committed (some runs were made elsewhere)
    sae_cfg = ex.run_saelens_cfg(run_cfg, folder)
    unl = read("unlearning.json")
    new_unl = ex.unlearning_record(run_cfg, sae_cfg, unl["eval_result_metrics"]["unlearning"]["unlearning_score"],
                                   unl["eval_result_details"], unl["eval_result_unstructured"]["sweep_points"])
    sp = read("sparse_probing.json")
    new_sp = ex.sparse_probing_record(run_cfg, sae_cfg, probing_result(sp))
    old_core = read("core.json") if (folder / "core.json").is_file() else None
    features = old_core["eval_result_details"] if old_core else []
    new_core = ex.core_record(run_cfg, sae_cfg, read("final_info.json")["sae"]["means"], features)
    for name, new, old in (("unlearning.json", new_unl, unl), ("sparse_probing.json", new_sp, sp),
                           ("core.json", new_core, old_core)):
        ex.atomic_write_json(folder / name, keep_when(new, old))
    missing = new_core["eval_result_unstructured"]["not_measured"]
    return f"{rel}: 3 files written; core.json: {len(missing)} metrics not in the folder"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="*", type=Path, help="run or seed folders (default: every one under run_*)")
    args = p.parse_args(argv)
    try:
        folders = args.folders or run_folders(ROOT)
        if not folders:
            raise ex.UsageError("no run folder with an unlearning.json")
        for f in folders:
            try:
                print(rewrite(f, ROOT))
            except (KeyError, TypeError, AttributeError) as e:  # a file of another layout
                raise ex.UsageError(f"{f}: a results file lacks or mistypes {e}") from None
    except ex.UsageError as e:
        print(f"saebench_files.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

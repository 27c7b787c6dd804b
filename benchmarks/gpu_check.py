"""Run every stage of every bundle on CUDA, with and without AMP (and with the speed options ``channels_last``,
``compile`` and ``data_on_device``), for a few epochs; print and write a table.

``python benchmarks/gpu_check.py --output gpu_check`` (see ``benchmarks/gpu_check.sh`` for the device machine).
Each (bundle, precision) runs the teacher, distillation, evaluation and inference stages in-process through MONAI's
``ConfigWorkflow`` (what ``python -m monai.bundle run`` does) on the bundle's generated default data, checks that
every network of every engine sits on the GPU and that each stage wrote its outputs, and records the test metric.
One stage also runs through the command line, and the multi-GPU config through ``torchrun`` (one process, NCCL).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from medkd.bundles import (
    EVAL_DIR,
    MODELS_DIR,
    RESULTS_JSON,
    TEACHER_CHECKPOINT,
    checkpoint_file,
    stage_files,
    stage_workflow,
)

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
STAGES = ("train_teacher", "train", "evaluate", "inference")
PRECISIONS = {
    "fp32": {"amp": False},
    "bf16": {"amp": True},
    "fp16": {"amp": True, "amp_kwargs": "${'dtype': torch.float16}"},
    # the speed options: networks channels-last and compiled (inductor), images cached on the GPU, batches from a
    # ThreadDataLoader
    "bf16-fast": {"amp": True, "channels_last": True, "compile": True, "data_on_device": True},
}
OUTPUTS = {
    "train_teacher": [f"{MODELS_DIR}/{TEACHER_CHECKPOINT}"],
    "train": [f"{MODELS_DIR}/{checkpoint_file(name)}" for name in ("sp", "sf")],
    "evaluate": [f"{EVAL_DIR}/{RESULTS_JSON}"],
}
ENGINES = {
    "train_teacher": "train#trainer",
    "train": "train#trainer",
    "evaluate": "evaluator",
    "inference": "evaluator",
}


def _networks(engine) -> dict[str, torch.nn.Module]:
    if hasattr(engine, "students"):
        return {**engine.students, **({"teacher": engine.teacher} if engine.teacher is not None else {})}
    return dict(engine.networks) if hasattr(engine, "networks") else {"network": engine.network}


def run_stage(bundle: str, stage: str, root: Path, overrides: dict) -> dict:
    """Run one stage; return its row (seconds, networks' devices, outputs found)."""
    start = time.perf_counter()
    workflow = stage_workflow(BUNDLES / bundle, stage, bundle_root=str(root), **overrides)
    workflow.initialize()
    workflow.run()
    engine = workflow.parser.get_parsed_content(ENGINES[stage])
    devices = sorted({str(p.device) for net in _networks(engine).values() for p in net.parameters()})
    workflow.finalize()
    missing = [f for f in OUTPUTS.get(stage, []) if not (root / f).is_file()]
    if stage == "inference":
        outputs = [p for p in (root / EVAL_DIR).rglob("*") if p.is_file() and p.suffix in (".gz", ".csv", ".nii")]
        missing += [] if outputs else ["inference outputs"]
    ok = devices == [str(torch.device("cuda", 0))] and not missing
    return {"seconds": round(time.perf_counter() - start, 1), "devices": devices, "missing": missing, "ok": ok}


def check(output: Path, epochs: int, bundles: list[str], precisions: list[str], fp16: list[str]) -> list[dict]:
    rows = []
    for bundle in bundles:
        for precision in precisions + (["fp16"] if bundle in fp16 else []):
            root = output / bundle / precision
            root.mkdir(parents=True, exist_ok=True)
            overrides = {"max_epochs": epochs, **PRECISIONS[precision]}
            for stage in STAGES:
                row = {"bundle": bundle, "precision": precision, "stage": stage}
                try:
                    row.update(run_stage(bundle, stage, root, overrides))
                except Exception as e:  # noqa: BLE001 - record and go on to the other stages
                    row.update(ok=False, error=f"{type(e).__name__}: {e}"[-800:])
                    traceback.print_exc()
                if stage == "evaluate" and row.get("ok"):
                    results = json.loads((root / EVAL_DIR / RESULTS_JSON).read_text())
                    metric = "mean_dice" if "mean_dice" in results[0] else "auc"
                    row["metric"] = {r["network"]: round(float(r[metric]), 4) for r in results}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def command_line_checks(output: Path) -> list[dict]:
    """The 2D segmentation evaluation through ``python -m monai.bundle run``, and the multi-GPU config through
    ``torchrun`` (one process, NCCL, SyncBatchNorm), as a user types them."""
    bundle, root = "segmentation_2d", output / "segmentation_2d" / "bf16"
    configs = [str(p) for p in stage_files(BUNDLES / bundle, "evaluate")]
    base = ["-m", "monai.bundle", "run", "--config_file", json.dumps(configs), "--bundle_root", str(root)]
    runs = {
        "cli evaluate --amp True": [sys.executable, *base, "--amp", "True"],
        "torchrun multi_gpu_train": [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "-m", "monai.bundle", "run",
            "--config_file", json.dumps([str(p) for p in stage_files(BUNDLES / bundle, "multi_gpu_train")]),
            "--bundle_root", str(output / "ddp"), "--max_epochs", "2", "--amp", "True",
            "--teacher_ckpt", str(root / MODELS_DIR / TEACHER_CHECKPOINT),
        ],
    }  # fmt: skip
    rows = []
    for name, cmd in runs.items():
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        row = {
            "bundle": bundle,
            "stage": name,
            "ok": proc.returncode == 0,
            "seconds": round(time.perf_counter() - start, 1),
        }
        if proc.returncode:
            row["error"] = proc.stderr[-800:]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="gpu_check", help="folder of the runs and of gpu_check.json/.md")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--bundles", default="segmentation_2d,segmentation_3d,classification_2d,classification_3d")
    parser.add_argument("--precisions", default="fp32,bf16,bf16-fast", help=f"of {list(PRECISIONS)}")
    parser.add_argument("--fp16", default="segmentation_2d", help="bundles also run in float16 (gradient scaler)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU", file=sys.stderr)
        return 2
    output = Path(args.output).resolve()
    rows = check(output, args.epochs, args.bundles.split(","), args.precisions.split(","), args.fp16.split(","))
    rows += command_line_checks(output)
    device = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    lines = [
        f"GPU check on {device}",
        "",
        "| bundle | precision | stage | ok | s | test metric |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        metric = r.get("metric", r.get("error", ""))
        lines.append(f"| {r['bundle']} | {r.get('precision', '')} | {r['stage']} | {'yes' if r['ok'] else 'NO'} | "
                     f"{r.get('seconds', '')} | {metric} |")  # fmt: skip
    (output / "gpu_check.md").write_text("\n".join(lines) + "\n")
    (output / "gpu_check.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    print("\n".join(lines))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Learning-rate sweep on a validation split carved from the training data (the test split is never looked at),
to set each task's per-method default learning rates.

    python benchmarks/lr_sweep.py --task vit-fashion --sweep svfit=5e-2,2e-1 lora=1e-3,5e-3 --train-limit 1000

Prints validation accuracy per (method, lr) and writes benchmarks/results/<task>/lr_sweep.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from svfit.methods import MethodOptions
from svfit.train.results import held_out, system_info, write_json
from svfit.train.run import RunConfig, train_run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="sentiment")
    p.add_argument("--sweep", nargs="+", required=True, metavar="METHOD=LR,LR,...")
    p.add_argument("--head-lr", type=float)
    p.add_argument("--epochs", type=float)
    p.add_argument("--train-limit", type=int)
    p.add_argument("--eval-limit", type=int, help="validation examples (from the end of the training data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for item in args.sweep:
            method, lrs = item.split("=", 1)
            for lr in (float(x) for x in lrs.split(",")):
                config = RunConfig(
                    task=args.task, method=method, out=Path(tmp) / f"{method}-{lr:g}", seed=args.seed,
                    epochs=args.epochs, lr=lr, head_lr=args.head_lr, train_limit=args.train_limit,
                    eval_limit=args.eval_limit, validation=True, options=MethodOptions(), overwrite=True,
                    progress=False,
                )
                result = train_run(config, echo=lambda s: print("   ", s, file=sys.stderr))
                final = result["train_info"]["metrics"][-1]
                rows.append({"method": method, "lr": lr, "head_lr": result["run_info"]["train_config"]["head_lr"],
                             "val_accuracy": held_out(final)["accuracy"], "val_loss": held_out(final)["loss"],
                             "train_time": result["train_info"]["train_time"]})
                print(f"{method:6s} lr={lr:<8g} val accuracy {held_out(final)['accuracy']:.4f}  "
                      f"loss {held_out(final)['loss']:.4f}  ({result['train_info']['train_time']:.0f} s)", flush=True)
    out = args.out / args.task
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "lr_sweep.json", {"task": args.task, "args": vars(args) | {"out": str(args.out)},
                                       "system": system_info(), "rows": rows})


if __name__ == "__main__":
    main()

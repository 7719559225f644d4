"""The ``visionzoo`` command: argument parsing only. Each sub-command turns its arguments into
a resolved config or a path and calls one function that does the work."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from visionzoo.errors import Stopped, UserError

if TYPE_CHECKING:  # annotations only: the config is imported where a command needs it
    from visionzoo.config import ModelConfig, RecipeConfig

EXAMPLES = """examples:
  visionzoo recipes                                         # the recipes and their seed targets
  visionzoo recipes --show resnet50_cifar100 optim.lr=0.2   # one recipe, fully resolved
  make demo                                                 # = visionzoo train fashion_mnist
  visionzoo train resnet50_cifar100 --data ~/data/cifar-100-python
  visionzoo train alexnet_imagenet --data /data/imagenet --perf        # short run, prints FPS
  visionzoo train densenet201_imagenet --data /data/imagenet --devices 8   # 8 GPUs on this machine
  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
      -m visionzoo train nfnet_f0_imagenet --data /data/imagenet         # several machines
  visionzoo train nfnet_f0_imagenet --data /data/imagenet optim.lr=0.2 data.batch_size=64
  visionzoo eval runs/<run> --data /data/imagenet
  visionzoo eval --weights dm_nfnet_f0.pth --recipe nfnet_f0_imagenet --data /data/imagenet
  visionzoo knn --weights dino_deitsmall16_pretrain.pth --recipe dino_vits16_imagenet --data /data/imagenet
  visionzoo train fashion_mnist model.weights=pretrained.pth            # initialise, then fine-tune
  visionzoo export runs/<run>                               # -> <run>/model.onnx, checked vs PyTorch
  visionzoo infer runs/<run>/model.onnx --data /data/imagenet   # or: ... model.onnx image.jpg
  visionzoo report runs/<run>                               # -> <run>/report/index.html
"""

# The range of every numeric flag (by its argparse name; ranges.RANGES's notation). Flags that
# alias a config key have that key's range.
FLAG_RANGES = {
    "devices": ">=1", "steps": ">=1", "epochs": ">=0", "batch_size": ">=1", "lr": ">=0", "workers": ">=0",
    "seed": ">=0", "opset": "9..20", "tolerance": ">0", "shard_samples": ">=0", "resize": ">=0", "quality": "1..100",
    "calibration_images": ">=1",
}


def _add_config_flags(p: argparse.ArgumentParser, training: bool = True) -> None:
    """Overrides, --data and the seed scripts' flags; without ``training`` (eval, knn, linear)
    the flags that only change training (--epochs, --lr, --seed) are left out."""
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.2")
    p.add_argument("--data", help="data folder, or 'synthetic' for random images")
    g = p.add_argument_group("seed-script flags (aliases of config keys)")
    if training:
        g.add_argument("--epochs", type=int, help="train.epochs")
    g.add_argument("--batch-size", type=int, help="data.batch_size (global, all devices)")
    if training:
        g.add_argument("--lr", type=float, help="optim.lr")
    g.add_argument("--workers", type=int, help="data.workers (per device)")
    if training:
        g.add_argument("--seed", type=int, help="train.seed")
    g.add_argument("--amp", nargs="?", const="auto", help="train.amp: auto|none|bf16|fp16 (apex O0/O1/O2 accepted)")
    g.add_argument("--device", help="train.device: auto|cpu|cuda|cuda:N|mps")


def _add_weights_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("released weights")
    g.add_argument("--weights", metavar="FILE",
                   help="weights to use instead of the checkpoint's: DINO *_pretrain.pth or training checkpoint, "
                        "timm/torchvision state dict (.pth/.bin/.safetensors), mmcls checkpoint, "
                        "visionzoo .safetensors")
    g.add_argument("--recipe", help="the recipe whose model and data --weights go with (default: the run folder's)")
    g.add_argument("--checkpoint-key", choices=("teacher", "student"),
                   help="network of a DINO training checkpoint (model.checkpoint_key, default teacher)")


def _overrides(args: argparse.Namespace) -> list[str]:
    """Config overrides from the aliases, --data and the positional key=value list (last wins)."""
    from visionzoo.config import AMP_ALIASES, FLAG_ALIASES
    from visionzoo.data.sources.table import data_override

    out = [data_override(args.data)] if args.data else []
    for flag, key in FLAG_ALIASES.items():
        value = getattr(args, flag, None)
        if value is not None:
            if flag == "amp":
                value = AMP_ALIASES.get(str(value).lower(), value)
            out.append(f"{key}={value}")
    return out + list(args.overrides)


def _config(recipe: str, overrides: list[str]):
    """``load_config`` plus the data.name check of the data source table (above config), both before torch."""
    from visionzoo.config import load_config
    from visionzoo.data.sources.table import data_source

    cfg = load_config(recipe, overrides)
    data_source(cfg.data.name)
    return cfg


def cmd_recipes(args: argparse.Namespace) -> None:
    from visionzoo.config import load_config, recipe_names
    from visionzoo.run_folder import format_table

    if args.show:
        print(_shown_recipe(_config(args.show, _overrides(args))), end="")
        return
    rows = []
    for name in recipe_names():
        c = load_config(name)
        rows.append({"recipe": name, "model": _model_name(c.model), "data": c.data.name,
                     "seed target": c.seed_target, "source": c.source})
    print(format_table(rows, ("recipe", "model", "data", "seed target", "source")))


def _model_name(m: ModelConfig) -> str:
    """A recipe's network as the recipes table names it: library and name, plus the constructor
    arguments that change it (a timm ViT resized to 28 px is not the 224 px one its name says)."""
    shape = ", ".join(f"{k} {v}" for k, v in m.kwargs.items() if k != "dynamic_img_size")
    return f"{m.library} {m.name}" + (f" with {shape}" if shape else "")


def _shown_recipe(cfg: RecipeConfig) -> str:
    """``recipes --show``'s YAML, with data.num_classes as training will have it: counted from
    the data where that needs no reading of images (class folders, a manifest), else said."""
    from visionzoo.config import to_yaml
    from visionzoo.data.sources.class_folders import count_classes

    count, source = count_classes(cfg.data)
    if cfg.data.name == "synthetic":
        return to_yaml(cfg)
    if count is None:
        return to_yaml(cfg, {"data.num_classes": f"not used: {source}"})
    cfg.data.num_classes = count
    return to_yaml(cfg, {"data.num_classes": f"{source}: what training uses"})


def cmd_train(args: argparse.Namespace) -> None:
    overrides = _overrides(args)
    if args.steps is not None:
        overrides.append(f"train.perf_steps={args.steps}")
    if args.output:
        overrides.append(f"output={args.output}")
    # Config mistakes stop here, before any launch and before torch is imported (seconds).
    cfg = _config(args.recipe, overrides)
    from visionzoo.engine.tasks import check_task

    check_task(cfg.task)
    from visionzoo import distributed
    from visionzoo.api import fit_config
    from visionzoo.engine.resume import plan_resume
    from visionzoo.engine.run import launch

    plan = plan_resume(cfg, args.resume, args.output, overrides)  # what visionzoo.train(resume=...) does too
    if plan.finished is not None:
        if distributed.from_env().is_main:
            from visionzoo.run_folder import format_table

            print(f"visionzoo: {plan.note}\n{format_table([plan.finished])}")
        return
    if plan.note and not distributed.in_launched_worker():
        print(f"visionzoo: {plan.note}")
    if args.devices > 1 and not distributed.in_launched_worker():
        raise SystemExit(launch(plan.cfg, args.devices, args.argv))
    try:
        fit_config(plan.cfg, perf=args.perf, resume_dir=plan.resume_dir)  # what visionzoo.train runs too
    except Stopped as err:  # the command that continues the run, as this one was typed
        devices = f" --devices {args.devices}" if args.devices > 1 else ""
        err.resume_command = f"visionzoo train {args.recipe} --resume {err.run_dir}{devices}"
        raise


def cmd_bench(args: argparse.Namespace) -> None:
    from visionzoo.data.sources.table import generated_source

    synthetic = generated_source(args.data) is not None
    if synthetic:  # --data synthetic: bench's own source, decode-free images through the recipe's loader
        args.data = None
    overrides = _overrides(args)
    if args.steps is not None:
        overrides.append(f"train.perf_steps={args.steps}")
    if args.compile:
        overrides.append("train.compile=true")
    cfg = _config(args.recipe, overrides)  # before torch is imported
    from visionzoo import distributed
    from visionzoo.commands.bench import run_bench
    from visionzoo.engine.run import launch

    if args.devices > 1 and not distributed.in_launched_worker():
        raise SystemExit(launch(cfg, args.devices, args.argv))
    run_bench(cfg, synthetic=synthetic, precisions=args.precision, output=args.output)


def _weights_args(args: argparse.Namespace) -> tuple[str | None, list[str], dict]:
    """The checkpoint argument, the config overrides and the --weights/--recipe keywords of a
    command that reads weights. The checkpoint is optional with --weights, so argparse may hand
    it the first key=value override: that goes back to the overrides."""
    checkpoint, extra = args.checkpoint, []
    if checkpoint and "=" in checkpoint and not Path(checkpoint).exists():
        checkpoint, extra = None, [checkpoint]
    keys = [f"model.checkpoint_key={args.checkpoint_key}"] if args.checkpoint_key else []
    overrides = keys + extra + _overrides(args)
    _check_early(checkpoint, overrides, args.weights, args.recipe)
    return checkpoint, overrides, {"weights": args.weights, "recipe": args.recipe}


def _check_early(checkpoint: str | None, overrides: list[str], weights: str | None, recipe: str | None) -> None:
    """The config mistakes a command that reads weights can be told about before torch is
    imported: overrides checked against --recipe or the run folder's config.yaml. (The command
    resolves its config again from the checkpoint's own copy.)"""
    if weights and recipe:
        _config(recipe, overrides)
    elif checkpoint and (Path(checkpoint).expanduser() / "config.yaml").is_file():
        _config(str(Path(checkpoint).expanduser() / "config.yaml"), overrides)


def cmd_eval(args: argparse.Namespace) -> None:
    checkpoint, overrides, kw = _weights_args(args)  # config mistakes stop here, before torch
    from visionzoo.commands.evaluate import evaluate_checkpoint

    evaluate_checkpoint(checkpoint, overrides, **kw)


def cmd_knn(args: argparse.Namespace) -> None:
    checkpoint, overrides, kw = _weights_args(args)  # config mistakes stop here, before torch
    from visionzoo.commands.evaluate import knn_checkpoint

    knn_checkpoint(checkpoint, overrides, **kw)


def cmd_linear(args: argparse.Namespace) -> None:
    epochs, args.epochs = args.epochs, None  # here --epochs is the probe's, not the pre-training's
    checkpoint, overrides, kw = _weights_args(args)  # config mistakes stop here, before torch
    from visionzoo.commands.evaluate import linear_checkpoint

    linear_checkpoint(checkpoint, overrides + ([f"dino.linear_epochs={epochs}"] if epochs else []), **kw)


def cmd_export(args: argparse.Namespace) -> None:
    args.overrides, args.data = [], None  # export takes no config flags beyond --checkpoint-key
    checkpoint, overrides, kw = _weights_args(args)
    from visionzoo.commands.export import ExportOptions, export_checkpoint

    options = ExportOptions(
        opset=args.opset, tolerance=args.tolerance, precision=args.precision,
        calibration_images=args.calibration_images, calibration=args.calibration,
        calibration_data=args.calibration_data, int8_target=args.int8_target, full_checkpoint=args.full_checkpoint)
    export_checkpoint(checkpoint, args.format, args.output, overrides=overrides, options=options, **kw)


def cmd_infer(args: argparse.Namespace) -> None:
    from visionzoo.commands.infer import run_infer

    run_infer(args.model, args.images, args.data, args.batch_size, args.workers, args.output, args.strict)


def cmd_report(args: argparse.Namespace) -> None:
    from visionzoo.html_report.build import write_report

    overrides = [f"data.path={args.data}"] if args.data else []
    for flag, key in (("device", "train.device"), ("batch_size", "data.batch_size"), ("workers", "data.workers")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    print(write_report(args.run, overrides + list(args.overrides), max_images=args.max_images))


def cmd_data(args: argparse.Namespace) -> None:
    if args.data_command == "pack":
        from visionzoo.data.pack import PackOptions, pack

        options = PackOptions(shard_size=args.shard_size, shard_samples=args.shard_samples, resize=args.resize,
                              quality=args.quality, seed=args.seed, workers=args.workers, check=not args.no_check)
        pack(args.src, args.out, args.format, args.source, options)
    elif args.data_command == "verify":
        from visionzoo.data.pack import verify

        verify(args.out, deep=args.deep)
    else:
        from visionzoo.data.scan import scan_report

        scan_report(args.dir, check=not args.no_check, workers=args.workers)


def cmd_runs(args: argparse.Namespace) -> None:
    from visionzoo.commands.runs import print_compare, print_runs

    if args.compare:
        print_compare(*args.compare)
    else:
        print_runs(args.dir)


def _examples(*commands: str) -> str:
    """A sub-command's --help epilog: its example command lines."""
    return "examples:\n" + "".join(f"  {c}\n" for c in commands)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command (tests run each --help)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="visionzoo", epilog=EXAMPLES, formatter_class=fmt,
        description="Train, evaluate, time, export and run the classic image-classification recipes "
                    "(AlexNet, DenseNet-201, ResNet-50 on CIFAR-100, NFNet-F0, DINO ViT-S/16) on 1 device, "
                    "N devices or many machines. Details of a command: visionzoo COMMAND --help.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("recipes", help="list the recipes, or print one resolved (--show)", formatter_class=fmt,
                       epilog=_examples("visionzoo recipes",
                                        "visionzoo recipes --show nfnet_f0_imagenet train.epochs=10"))
    p.add_argument("--show", metavar="RECIPE", help="print RECIPE fully resolved, as YAML")
    _add_config_flags(p)
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("train", help="train a recipe (or time it with --perf)", formatter_class=fmt,
                       epilog="examples:\n  visionzoo train fashion_mnist\n"
                              "  visionzoo train resnet50_cifar100 --data ~/data/cifar-100-python --epochs 10\n"
                              "  visionzoo train densenet201_imagenet --data synthetic --perf --steps 50\n")
    p.add_argument("recipe", help="recipe name (visionzoo recipes) or a recipe YAML file")
    _add_config_flags(p)
    p.add_argument("--perf", action="store_true", help="performance run: time a fixed number of steps, report img/s")
    p.add_argument("--steps", type=int, help="timed steps of a --perf run (train.perf_steps, default 100)")
    p.add_argument("--output", help="run folder (default runs/<recipe>-<timestamp>)")
    p.add_argument("--resume", metavar="RUN_DIR|auto",
                   help="continue a run from its newest checkpoint (auto: the newest unfinished run of "
                        "this recipe, or of --output)")
    p.add_argument("--devices", type=int, default=1,
                   help="worker processes on this machine, one per GPU (gloo on the CPU); "
                        "under torchrun this is ignored: torchrun decides")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="training img/s: model-only vs end-to-end (with the data path), per precision",
                       formatter_class=fmt,
                       epilog="examples:\n  visionzoo bench fashion_mnist\n"
                              "  visionzoo bench resnet50_cifar100 --data synthetic --steps 50 data.batch_size=512\n"
                              "  visionzoo bench alexnet_imagenet --data /data/imagenet --precision bf16 --compile\n"
                              "  visionzoo bench dino_vits16_imagenet --data /data/imagenet data.decode=device\n")
    p.add_argument("recipe", help="recipe name (visionzoo recipes) or a recipe YAML file")
    _add_config_flags(p)
    p.add_argument("--steps", type=int, help="timed steps per measurement (train.perf_steps, default 100; "
                                             "untimed warm-up: train.perf_warmup_steps)")
    p.add_argument("--precision", metavar="LIST",
                   help="comma-separated fp32,bf16,fp16 (default: fp32, bf16 where supported, and the recipe's)")
    p.add_argument("--compile", action="store_true",
                   help="also time each precision with torch.compile (slow to compile)")
    p.add_argument("--output", help="JSON file (*.json) or folder for bench.json (default runs/<recipe>-bench-<time>/)")
    p.add_argument("--devices", type=int, default=1,
                   help="worker processes on this machine, one per GPU; img/s are totals over all of them")
    p.set_defaults(func=cmd_bench)

    # Commands that read a checkpoint and take config flags: (name, help, examples, function).
    for name, text, examples, func in (
        ("eval", "evaluate a checkpoint: top-1, top-5, loss",
         ["visionzoo eval runs/fashion_mnist-20261123-101500",
          "visionzoo eval runs/<run>/best.safetensors --data /data/imagenet --batch-size 128",
          "visionzoo eval --weights resnet50_cifar100.pth --recipe resnet50_cifar100 --data ~/data/cifar-100-python"],
         cmd_eval),
        ("knn", "weighted k-NN accuracy of a (DINO) checkpoint's frozen backbone",
         ["visionzoo knn runs/dino_fashion_mnist-20261123-101500",
          "visionzoo knn runs/<run> --data /data/imagenet dino.knn_k=[20]",
          "visionzoo knn --weights dino_deitsmall16_pretrain_full_checkpoint.pth --checkpoint-key teacher "
          "--recipe dino_vits16_imagenet --data /data/imagenet"], cmd_knn),
        ("linear", "linear probe on a (DINO) checkpoint's frozen backbone: Acc@1",
         ["visionzoo linear runs/<run> --data /data/imagenet          # 100 epochs",
          "visionzoo linear runs/<run> --epochs 10 dino.linear_augment=false",
          "visionzoo linear --weights dino_deitsmall16_pretrain.pth --recipe dino_vits16_imagenet "
          "--data /data/imagenet"],
         cmd_linear),
    ):
        p = sub.add_parser(name, help=text, formatter_class=fmt,
                           epilog=_examples(*examples))
        p.add_argument("checkpoint", nargs="?", help="a run folder or a .safetensors file (optional with --weights)")
        _add_config_flags(p, training=False)
        if name == "linear":  # the probe's own training length
            p.add_argument("--epochs", type=int, help="epochs of the linear probe (dino.linear_epochs)")
        _add_weights_flags(p)
        p.set_defaults(func=func)

    examples = _examples(
        "visionzoo export runs/fashion_mnist-20261123-101500      # -> <run>/model.onnx + model.json",
        "visionzoo export runs/<run>/best.safetensors --opset 18 --output exported/",
        "visionzoo export runs/<run> --format torchscript",
        "visionzoo export runs/<run> --precision int8     # + model.int8.onnx (static QDQ, calibrated)",
        "visionzoo export --weights dm_nfnet_f0.pth --recipe nfnet_f0_imagenet --output nfnet/",
        "visionzoo export runs/<run> --format hf       # -> <run>/model_hf/: timm folder + model card")
    p = sub.add_parser("export", help="export a checkpoint to ONNX (or TorchScript / .pt2, or the layouts of "
                       "timm/HF, torchvision, DINO, mmcls), checked against PyTorch",
                       formatter_class=fmt, epilog=examples)
    p.add_argument("checkpoint", nargs="?", help="a run folder or a .safetensors file (optional with --weights)")
    _add_weights_flags(p)
    p.add_argument("--format", default="onnx",
                   choices=("onnx", "torchscript", "pt2", "hf", "torchvision", "dino", "mmcls"),
                   help="default: onnx; hf (timm folder + model card), torchvision, dino, mmcls: "
                        "the weights in that layout")
    p.add_argument("--full-checkpoint", action="store_true", help="dino: main_dino.py's training checkpoint too "
                   "(student, teacher, optimizer), from the run's newest checkpoint")
    p.add_argument("--opset", type=int, help="ONNX opset (9-20, default 17)")
    p.add_argument("--output", help="output file or folder (default: next to the checkpoint, <name>.onnx)")
    p.add_argument("--tolerance", type=float,
                   help="parity limit: max |torch - exported| <= tolerance * max(1, max |logit|) (default 1e-4)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "int8", "bf16"),
                   help="int8: also write <name>.int8.onnx, statically quantised (QDQ, per-channel weights) by "
                        "ONNX Runtime; bf16: <name>.bf16.onnx run with bf16 kernels (ONNX Runtime on Arm only). "
                        "--output X.onnx is then the fp32 model and X.int8.onnx the int8 one; "
                        "--output X.int8.onnx names the int8 file the same way")
    p.add_argument("--calibration-images", type=int, help="int8: training images the activation ranges are "
                   "calibrated on, with the eval preprocessing (default 512)")
    p.add_argument("--calibration", choices=("percentile", "minmax", "entropy"),
                   help="int8: calibration method (default percentile: the 99.999th percentile of a 2048-bin "
                        "histogram of each activation)")
    p.add_argument("--calibration-data", help="int8: data folder to calibrate on (default: the recipe's data.path)")
    p.add_argument("--int8-target", choices=("auto", "x86", "x86-vnni", "arm"),
                   help="int8: the CPUs the model is for (default auto: this machine's). x86: any x86-64 CPU, "
                        "7-bit weights (no saturation without VNNI); x86-vnni: AVX512-VNNI/AVX-VNNI/AMX, "
                        "8-bit weights; arm: 64-bit Arm, 8-bit weights")
    p.set_defaults(func=cmd_export)

    examples = _examples(
        "visionzoo infer runs/<run>/model.onnx --data /usr/share/datasets/fashion-mnist",
        "visionzoo infer runs/<run>/model.onnx --data /data/imagenet --batch-size 64 --output acc.json",
        "visionzoo infer runs/<run>/model.onnx shoe.png shirt.jpg",
        "visionzoo infer runs/<run>/model.onnx photos/ --output predictions.json")
    p = sub.add_parser("infer", help="run an exported ONNX model: accuracy and speed on a split, or top-5 per image",
                       formatter_class=fmt, epilog=examples)
    p.add_argument("model", help="a .onnx file written by visionzoo export (its .json sidecar next to it)")
    p.add_argument("images", nargs="*", help="image files to classify (instead of --data)")
    p.add_argument("--data", help="data folder of the validation split (default: the recipe's), or 'synthetic'")
    p.add_argument("--batch-size", type=int, help="images per ONNX Runtime call (default: the recipe's, at most 256)")
    p.add_argument("--workers", type=int, help="data.workers: loader processes for image folders")
    p.add_argument("--output", help="JSON results file (default: <model>.infer.json next to the model)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first image that cannot be read (default: name it, skip it, count it)")
    p.set_defaults(func=cmd_infer)
    _add_data_parser(sub, fmt)
    p = sub.add_parser("report", help="write RUN/report/index.html: curves, results, per-class accuracy, confusion, "
                                      "mistakes, calibration (DINO: attention maps, k-NN neighbours)",
                       formatter_class=fmt,
                       epilog="examples:\n  visionzoo report runs/fashion_mnist-20261123-101500\n"
                              "  visionzoo report runs/<run> --data /data/imagenet --max-images 48\n"
                              "  visionzoo report runs/<run> --device cpu --batch-size 64\n")
    p.add_argument("run", help="a run folder")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for the prediction pass")
    p.add_argument("--data", help="data folder of the validation split (default: the run's)")
    p.add_argument("--max-images", type=int, default=24, metavar="N",
                   help="images per grid (most confident mistakes, least confident correct; default 24)")
    p.add_argument("--device", help="train.device of the prediction pass: auto|cpu|cuda|cuda:N|mps")
    p.add_argument("--batch-size", type=int, help="images per batch of the prediction pass")
    p.add_argument("--workers", type=int, help="data.workers: loader processes for image folders")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("runs", help="list the runs under a folder, or compare two runs", formatter_class=fmt,
                       epilog=_examples("visionzoo runs", "visionzoo runs /scratch/runs",
                                        "visionzoo runs runs/fashion_mnist-20261123-101500   # one run",
                                        "visionzoo runs --compare runs/a runs/b     # differing config keys + results"))
    p.add_argument("dir", nargs="?", default="runs",
                   help="folder holding run folders, or one run folder (default: runs)")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="show two runs' config differences and results")
    p.set_defaults(func=cmd_runs)
    return parser


def _add_data_parser(sub: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:
    """``visionzoo data pack|verify|scan``: convert, check and inspect data sets."""
    from visionzoo.data.sources.table import names  # --format: the packed sources; --source: map-style ones

    p = sub.add_parser("data", help="pack data into shards, verify shards, scan an image folder", formatter_class=fmt,
                       epilog=_examples(
                           "visionzoo data pack /data/imagenet /data/in1k-wds --format webdataset --workers 8",
                           "visionzoo data pack /data/imagenet /data/in1k-256 --resize 256 --shard-size 1GB",
                           "visionzoo data pack ~/data/cifar-100-python /data/c100-hf --format hfds",
                           "visionzoo data verify /data/in1k-wds", "visionzoo data scan /data/imagenet --workers 8"))
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = dsub.add_parser("pack", help="convert an ImageFolder (or CIFAR / IDX) folder into tar or parquet shards",
                        formatter_class=fmt)
    q.add_argument("src", help="ImageFolder root (train/ and val/), CIFAR folder or IDX folder")
    q.add_argument("out", help="output folder (new or empty)")
    q.add_argument("--format", default=names(packed=True)[0], choices=names(packed=True),
                   help="webdataset: OUT/train-NNNNNN.tar; hfds: the Hub's parquet layout (default: webdataset)")
    q.add_argument("--shard-size", default="512MB", help="largest shard, e.g. 512MB, 1GB (default 512MB)")
    q.add_argument("--shard-samples", type=int, default=0, help="also at most this many images per shard (0: no limit)")
    q.add_argument("--resize", type=int, default=0,
                   help="re-encode images whose short side exceeds S at short side S (JPEG); 0: copy files as they are")
    q.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    q.add_argument("--workers", type=int, default=0, help="encoding processes (default 0: in this process)")
    q.add_argument("--seed", type=int, default=0, help="seed of the one shuffle of the training samples")
    q.add_argument("--no-check", action="store_true",
                   help="copy files without decoding them (default: decode each once; undecodable ones are "
                        "left out and listed in manifest.json)")
    q.add_argument("--source", default="auto", choices=("auto", *names(map_style=True, generated=False)),
                   help="what SRC holds (default: guessed)")
    q = dsub.add_parser("verify", help="re-check shards against their manifest.json (size, sha256)",
                        formatter_class=fmt)
    q.add_argument("out", help="a folder written by visionzoo data pack")
    q.add_argument("--deep", action="store_true", help="also read every shard and count its samples")
    q = dsub.add_parser("scan", help="images per class, unreadable files and the file-list cache of an image folder",
                        formatter_class=fmt)
    q.add_argument("dir", help="ImageFolder root (with train/ val/) or one split folder")
    q.add_argument("--no-check", action="store_true", help="only list and count files, do not decode them")
    q.add_argument("--workers", type=int, default=0, help="decoding processes (default 0: in this process)")
    p.set_defaults(func=cmd_data)


def _check_flag_ranges(args: argparse.Namespace) -> None:
    """One line for a numeric flag out of its range (FLAG_RANGES)."""
    from visionzoo.ranges import check_range

    for dest, spec in FLAG_RANGES.items():
        value = getattr(args, dest, None)
        if value is not None:
            check_range(value, spec, f"--{dest.replace('_', '-')}")


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse a command line (without running it; tests/test_docs.py checks the docs' commands with it).
    A mistake exits 2 with argparse's message."""
    parser = parser or build_parser()
    # key=value overrides may stand anywhere, also after flags, which argparse alone cannot parse.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (2 for a user error, with one line on stderr)."""
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a launcher hands to its workers
    try:
        _check_flag_ranges(args)
        args.func(args)
    except Stopped as err:  # a signal: one line from rank 0, exit 128 + signal number
        if not err.quiet:
            print(f"visionzoo: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except UserError as err:
        if not err.quiet:
            print(f"visionzoo: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("visionzoo: interrupted", file=sys.stderr)
        return 130
    return 0

"""`hcd` command line: thin argument parsing over the engine's entry points.

Exit codes: 0 success, 2 bad input (config, data, arguments) with a one-line message, 3 `hcd train` stopped
by Ctrl-C / SIGTERM with a checkpoint (continue with --resume), 1 anything else.
Heavy imports (torch, timm, deepspeed, dali) happen inside the subcommands so `hcd --help` is instant and
`hcd verify` / `hcd bench` run on machines without DeepSpeed or DALI.
"""
import argparse
import sys


def _config(args):
    """The run config, its files and folders checked: a missing one is reported before torch is imported
    (the config file) or before any model is built (the paths it names)."""
    from pathlib import Path

    from hcd.engine.config_tree import ConfigError
    if not Path(args.config).expanduser().is_file():
        raise ConfigError(f"{args.config}: config file not found")
    from hcd.engine.config import check_paths, load_config
    cfg = load_config(str(Path(args.config).expanduser()), tuple(args.set or ()))
    check_paths(cfg)
    return cfg


def _train(args):
    cfg = _config(args)
    from hcd.engine.trainer import train
    return train(cfg, out=args.out, resume=args.resume)


def _eval(args):
    cfg = _config(args)
    from hcd.engine.evaluate import evaluate_checkpoint
    return evaluate_checkpoint(cfg, args.checkpoint, ema=args.ema)


def _verify(args):
    from hcd.engine.verify import run_verify
    return run_verify(device=args.device, quick=args.quick, json_path=args.json)


def _str_list(value):
    return [v for v in value.split(",") if v]


def _int_list(value):
    return [int(v) for v in value.split(",") if v]


_int_list.__name__ = "comma-separated integer list"  # argparse names the type in its error


def _bench(args):
    from hcd.engine.bench import run_bench, run_report
    if args.report:
        return run_report(args.report)
    return run_bench(device=args.device, out_dir=args.out, quick=args.quick, dtypes=args.dtype, ns=args.n,
                     only=args.only)


def _data_check(args):
    from hcd.engine.data.check import run_data_check
    return run_data_check(args.path, workers=args.workers)


def _demo(args):
    from hcd.engine.demo import run_demo
    return run_demo(out=args.out, overrides=tuple(args.set or ()))


def _compare(args):
    from hcd.engine.compare import run_compare
    return run_compare(args.config, args.methods, args.seeds, out=args.out, overrides=tuple(args.set or ()))


def _methods(value):
    from hcd.engine.compare import parse_methods
    try:
        return parse_methods(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _seed_count(value):
    if not value.lstrip("-").isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value!r}")
    return int(value)


def _plot(args):
    from hcd.engine.plot import plot_run
    return plot_run(args.run)


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line (exit 2), like every other bad input; the usage stays in --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hcd", description="Heterogeneous Complementary Distillation engine")
    # The `deepspeed` launcher inserts --local_rank=N before the subcommand; ranks come from LOCAL_RANK.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def with_config(sp):
        sp.add_argument("--config", required=True, help="YAML run config (see configs/)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override one config field, e.g. --set optim.lr=0.1 (repeatable)")

    t = sub.add_parser("train", help="distil a student with HCD (DeepSpeed ZeRO; 1 process or torchrun/deepspeed)")
    with_config(t)
    t.add_argument("--out", help="run folder (default: the config's `out`)")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint or exported student on the config's val split")
    with_config(e)
    e.add_argument("--checkpoint", required=True, help="checkpoint folder or exported .safetensors")
    e.add_argument("--ema", action="store_true", help="evaluate (and export) the checkpoint's EMA of the student "
                                                      "(train.ema_decay) instead of its live weights")
    e.set_defaults(func=_eval)

    v = sub.add_parser("verify", help="check the fused kernels against the float64 reference on this device")
    v.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    v.add_argument("--quick", action="store_true", help="small shapes only")
    v.add_argument("--json", metavar="FILE", default=None,
                   help="also write the table as a JSON record (device, versions, commit, every output)")
    v.set_defaults(func=_verify)

    b = sub.add_parser("bench", help="benchmark fused vs eager vs torch.compile; writes runs/bench/*.json")
    b.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    b.add_argument("--out", default="runs/bench", help="folder for the results JSON (default: runs/bench)")
    b.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    b.add_argument("--dtype", type=_str_list, default=None, metavar="LIST",
                   help="kernel rows of these dtypes only, e.g. fp16 or bf16,fp32 (CUDA plan; with --dtype or "
                        "--n the profile and the steps are left out)")
    b.add_argument("--n", type=_int_list, default=None, metavar="LIST",
                   help="head rows with these n_sublogits only, e.g. 2,8 (CUDA plan)")
    b.add_argument("--only", type=_str_list, default=None, metavar="LIST",
                   help="these sections alone, of kernel,profile,step,loader (e.g. --only step: the training-step "
                        "rows; one call per section fits a time limit)")
    b.add_argument("--report", metavar="FILE", default=None,
                   help="print the tables of a results JSON (also one cut short) instead of running")
    b.set_defaults(func=_bench)

    d = sub.add_parser("data-check", help="decode every image of a dataset folder and report bad files")
    d.add_argument("path", help="dataset folder (class sub-folders, or train/ and val/ of them)")
    d.add_argument("--workers", type=int, default=None, help="parallel decoders (default: CPU count)")
    d.set_defaults(func=_data_check)

    c = sub.add_parser("compare", help="train every method x seed under one recipe; table (compare.md/.json) "
                                       "and val curves (compare.png)")
    with_config(c)
    c.add_argument("--methods", type=_methods, default="ce,kd,dkd,dist,ofa,hcd", metavar="LIST",
                   help="comma-separated, of hcd,ofa,dkd,dist,kd,ce (default: all six)")
    c.add_argument("--seeds", type=_seed_count, default=3, metavar="N",
                   help="seeds per method: the config's seed, seed+1, ... (default 3)")
    c.add_argument("--out", help="comparison folder, runs in OUT/METHOD/seed-S (default: the config's `out`); "
                                 "run the same command again to continue an interrupted comparison")
    c.set_defaults(func=_compare)

    m = sub.add_parser("demo", help="the whole pipeline on the embedded digits data, on CPU in minutes")
    m.add_argument("--out", default="runs/demo", help="run folder")
    m.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field of configs/demo.yaml")
    m.set_defaults(func=_demo)

    pl = sub.add_parser("plot", help="redraw a run folder's loss and accuracy curves (curves.png)")
    pl.add_argument("run", help="run folder holding metrics.jsonl")
    pl.set_defaults(func=_plot)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from hcd.engine.errors import USER_ERRORS
    try:
        code = args.func(args)
    except USER_ERRORS as e:
        print(f"hcd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hcd {args.command}: interrupted", file=sys.stderr)
        return 1
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())

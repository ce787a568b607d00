"""The ``accel-nvme`` command line: argument parsing only; the work lives in the modules it calls."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from accel_nvme import bench, config, maintenance
from accel_nvme.bench.moe import MOE_HIDDEN, MOE_MODES, DecodeConfig, MoeShape
from accel_nvme.bench.moe_report import format_moe_report
from accel_nvme.bench.moe_run import run_moe

logger = logging.getLogger(__name__)

SQUEEZE_DEFAULTS = {
    "free_ram": 1_200_000_000,
    "size": 2_000_000_000,
    "batches": (16, 256),
    "forwards": 1,
    "warm_forwards": 3,
}
PLAIN_DEFAULTS = {"size": None, "batches": (64, 512), "forwards": 3, "warm_forwards": 2}
QUICK_DEFAULTS = {"size": 50_000_000, "batches": (4, 16), "forwards": 1, "warm_forwards": 1}
QUICK_BALLAST_BYTES = 2_000_000_000  # --quick: the ballast holds this much (filling all but 1.2 GB takes a minute)
PLOT_DEFAULT = "accel-nvme-bench.png"


def parse_size(text: str) -> int:
    """Bytes in a size such as ``1GB`` (decimal units) or ``512MiB`` (binary units)."""
    try:
        return config.parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _positive_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def _percentages(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v.strip().rstrip("%")) / 100 for v in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected percentages between 0 and 100 separated by commas, got {text!r}")
    return values


def _forward_modes() -> tuple[str, ...]:
    """The modes of the forward bench (linear, llama): the default ones, then the optional ones."""
    return (*bench.MODES, *(m.name for m in bench.OPTIONAL_MODES))


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    known = tuple(dict.fromkeys([*_forward_modes(), *MOE_MODES]))
    if not modes or set(modes) - set(known):
        raise argparse.ArgumentTypeError(f"expected modes among {', '.join(known)}, got {text!r}")
    return modes


def _add_bench_parser(commands: argparse._SubParsersAction) -> None:
    """The ``bench`` sub-command and its options."""
    b = commands.add_parser("bench", help="time cold and warm forwards of offloading modes on a synthetic model")
    b.add_argument(
        "--free-ram",
        type=parse_size,
        help="leave only this much RAM available while the modes run: a ballast process holds the rest (default"
        " 1.2GB, with a 2GB model: the regime the nvme tier exists for)",
    )
    b.add_argument(
        "--no-squeeze", action="store_true", help="run in the whole machine (defaults: 1.07 GB Linear model)"
    )
    b.add_argument("--size", type=parse_size, help="model size, e.g. 1GB (default 2GB squeezed); picks --hidden")
    b.add_argument("--layers", type=int, help="number of Linear layers (default 16); --model moe: decoder layers")
    b.add_argument(
        "--model",
        choices=("linear", "llama", "moe"),
        help="linear: Linear layers built in RAM; llama: a checkpoint loaded by from_pretrained (default: linear, or"
        " llama when it does not fit); moe: greedy decode of a Qwen3-MoE checkpoint, per-expert reads against"
        " whole-block streaming (docs/moe.md)",
    )
    b.add_argument("--experts", type=int, default=64, help="--model moe: experts per layer (default 64)")
    b.add_argument("--top-k", type=int, default=4, help="--model moe: experts per token (default 4)")
    b.add_argument("--new-tokens", type=int, default=16, help="--model moe: tokens generated per run (default 16)")
    b.add_argument("--hidden", type=int, help="hidden size (default 4096)")
    b.add_argument("--batch", type=_positive_ints, help="batch sizes (default 16,256 squeezed, else 64,512)")
    b.add_argument("--forwards", type=int, help="timed cold forwards per batch (default 1 squeezed, else 3)")
    b.add_argument("--offload-folder", help="where the temporary bench folder goes (default: current directory)")
    b.add_argument("--json", help="also write the report to this JSON file")
    b.add_argument(
        "--modes",
        type=_modes,
        help=f"default: {','.join(bench.MODES)}; also nvme_copy; --model moe: {','.join(MOE_MODES)}",
    )
    b.add_argument(
        "--warm-forwards", type=int, help="timed warm forwards per batch, page cache kept (default 3 squeezed, else 2)"
    )
    b.add_argument(
        "--from-pretrained",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="use a synthetic Llama checkpoint loaded by from_pretrained (default: when the model does not fit in RAM)",
    )
    b.add_argument(
        "--plot",
        default=PLOT_DEFAULT,
        help=f"write the report as a PNG to this path (default {PLOT_DEFAULT}; needs accel-nvme[plot])",
    )
    b.add_argument("--no-plot", dest="plot", action="store_const", const=None, help="write no PNG")
    b.add_argument(
        "--quick",
        action="store_true",
        help="the same path in about a minute: a 50 MB Llama loaded by from_pretrained, a ballast holding 2 GB, every"
        " mode, batches 4,16, one cold and one warm forward (a check that it runs, not a measurement)",
    )
    b.add_argument(
        "--storage-dtype",
        choices=list(bench.STORAGE_DTYPES),
        default="float32",
        help="store the weights in this dtype, computed in fp32 (default float32; the same model, fewer bytes)",
    )
    b.add_argument(
        "--resident-budget",
        type=_percentages,
        default=(),
        help="also run nvme with these shares of the model resident, in percent, e.g. 0,25,50,100",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``accel-nvme`` argument parser with its sub-commands."""
    parser = argparse.ArgumentParser(prog="accel-nvme", description="Stream offloaded weights from NVMe.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages (worker output included)")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_bench_parser(commands)
    c = commands.add_parser("config", help="write defaults to accel_nvme.yaml in accelerate's config folder")
    c.add_argument("--offload-folder", dest="offload_dir", help="where group files are written")
    c.add_argument("--prefetch-depth", type=int, help="groups read ahead of the one in use")
    c.add_argument("--io-threads", type=int, help="reads kept in flight")
    c.add_argument("--io-request-bytes", type=parse_size, help="size of one read request, e.g. 4MiB")
    c.add_argument("--direct-io", choices=config.DIRECT_IO_CHOICES, help="O_DIRECT: auto, on or off")
    c.add_argument("--group-bytes", type=parse_size, help="merge consecutive entries up to this size (0: never)")
    c.add_argument(
        "--verify-on-read",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="check each group against its digest on every read (default: on its first read after a launch)",
    )
    c.add_argument("--lock-timeout", type=float, help="seconds to wait for another process writing the same weights")
    c.add_argument("--resident-budget", help="host RAM for groups kept loaded, e.g. 6GiB, or auto")
    c.add_argument("--device-resident-budget", help="CUDA memory for groups kept loaded, e.g. 4GiB, or auto")
    c.add_argument(
        "--expert-streaming",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="read only the routed experts of fused MoE modules (default: on, for a CPU execution device)",
    )
    c.add_argument("--expert-cache-bytes", type=parse_size, help="host RAM for MoE experts read last, e.g. 1GiB")
    c.add_argument(
        "--copy",
        choices=("auto", "true", "false"),
        help="copy safetensors checkpoints into group files (true), stream them in place (false), or auto: in place "
        "when the checkpoint and the offload folder share a filesystem",
    )
    c.add_argument("--show", action="store_true", help="only print the settings in force and where they come from")
    for name, text in (
        ("inspect", "list the groups, sizes, dtypes and fingerprint of an offload folder (exit 1: nothing of ours)"),
        ("verify", "re-read every group file and check it against its manifest (exit 1 naming each bad file)"),
        ("clean", "remove what accel_nvme wrote in a folder, nothing else (exit 2: refused)"),
    ):
        m = commands.add_parser(name, help=text)
        m.add_argument("folder", help="an offload folder, or one accel-nvme-<fingerprint> folder in it")
        if name == "clean":
            m.add_argument("--dry-run", action="store_true", help="only list what would be removed")
        if name == "inspect":
            m.add_argument("--resident-budget", type=parse_size, default=0, help="show which groups it would keep")
    return parser


def _config(args: argparse.Namespace) -> None:
    path = config.config_file_path()
    if not args.show:
        settings = {name: getattr(args, name) for name in config.FIELDS}
        path = config.save_config(settings)
        print(f"wrote {path}")
    print(f"config file: {path}{'' if path.is_file() else ' (absent)'}")
    for name, value in dataclasses.asdict(config.load_config()).items():
        print(f"  {name}: {value}")


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    defaults = (PLAIN_DEFAULTS if args.no_squeeze else SQUEEZE_DEFAULTS) | (QUICK_DEFAULTS if args.quick else {})
    if args.model == "moe":
        _bench_moe(args, parser, defaults)
        return
    args.layers = 16 if args.layers is None else args.layers
    args.modes = args.modes or bench.MODES
    if set(args.modes) - set(_forward_modes()):
        parser.error(f"--modes: {', '.join(sorted(set(args.modes) - set(_forward_modes())))} only run with --model moe")
    size = args.size if args.size is not None or args.hidden is not None else defaults["size"]
    forwards = defaults["forwards"] if args.forwards is None else args.forwards
    warm_forwards = defaults["warm_forwards"] if args.warm_forwards is None else args.warm_forwards
    if args.size is not None and args.hidden is not None:
        parser.error("give --size or --hidden, not both")
    if args.no_squeeze and args.free_ram is not None:
        parser.error("give --free-ram or --no-squeeze, not both")
    if args.layers < 1 or forwards < 1 or warm_forwards < 0:
        parser.error("--layers and --forwards must be at least 1, --warm-forwards at least 0")
    hidden = bench.hidden_for_size(size, args.layers) if size is not None else args.hidden or 4096
    config = bench.BenchConfig(
        layers=args.layers,
        hidden=hidden,
        batches=args.batch or defaults["batches"],
        forwards=forwards,
        resident_shares=args.resident_budget,
        storage_dtype=args.storage_dtype,
    )
    plot = _plot_path(args, parser)
    logger.info("modes %s on %.2f GB of weights", ",".join(args.modes), config.model_bytes / 1e9)
    try:
        report = bench.run(
            config,
            args.modes,
            offload_folder=args.offload_folder,
            json_path=args.json,
            plot_path=plot,
            warm_forwards=warm_forwards,
            from_pretrained=_from_pretrained(args),
            free_ram=None if args.no_squeeze else args.free_ram or _default_free_ram(args.quick, defaults),
        )
    except bench.BallastError as e:
        parser.exit(2, f"accel-nvme bench: {e}\n")
    print(bench.format_report(report))
    if plot is not None:
        print(f"plot: {Path(plot).resolve()}")


def _from_pretrained(args: argparse.Namespace) -> bool | None:
    if args.model is not None:
        return args.model == "llama"
    return True if args.quick and args.from_pretrained is None else args.from_pretrained


def _bench_moe(args: argparse.Namespace, parser: argparse.ArgumentParser, defaults: dict) -> None:
    """``--model moe``: greedy decode of a synthetic Qwen3-MoE checkpoint (``bench.moe_run``)."""
    if args.batch or args.from_pretrained is not None or args.resident_budget or args.storage_dtype != "float32":
        parser.error(
            "--model moe decodes at batch 1 from fp32 checkpoint weights: no --batch, --from-pretrained,"
            " --resident-budget or --storage-dtype"
        )
    if args.no_squeeze and args.free_ram is not None:
        parser.error("give --free-ram or --no-squeeze, not both")
    if args.plot != PLOT_DEFAULT and args.plot is not None:
        parser.error("--model moe draws no plot: give --json for the figures")
    runs = defaults["forwards"] if args.forwards is None else args.forwards
    if runs < 1 or args.new_tokens < 2 or not 1 <= args.top_k <= args.experts:
        parser.error("--forwards must be at least 1, --new-tokens at least 2, and 1 <= --top-k <= --experts")
    if args.layers is not None:
        shape = MoeShape(args.hidden or MOE_HIDDEN, args.layers, args.experts, args.top_k)
    else:
        size = args.size or defaults["size"] or SQUEEZE_DEFAULTS["size"]
        shape = MoeShape.for_size(size, args.hidden or MOE_HIDDEN, args.experts, args.top_k)
    decode = DecodeConfig(
        shape, new_tokens=args.new_tokens, runs=runs, expert_cache_bytes=config.load_config().expert_cache_bytes
    )
    modes = args.modes or MOE_MODES
    if set(modes) - set(MOE_MODES):
        parser.error(f"--model moe runs the modes {', '.join(MOE_MODES)}, not {', '.join(set(modes) - set(MOE_MODES))}")
    try:
        report = run_moe(
            decode,
            modes,
            offload_folder=args.offload_folder,
            json_path=args.json,
            free_ram=None if args.no_squeeze else args.free_ram or _default_free_ram(args.quick, defaults),
        )
    except bench.BallastError as e:
        parser.exit(2, f"accel-nvme bench: {e}\n")
    print(format_moe_report(report))


def _default_free_ram(quick: bool, defaults: dict) -> int:
    if not quick:
        return defaults["free_ram"]
    import psutil

    return max(bench.MIN_FREE_RAM_BYTES, psutil.virtual_memory().available - QUICK_BALLAST_BYTES)


def _plot_path(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str | None:
    """Where the PNG goes: ``--plot`` (the default too) when matplotlib imports; otherwise say how to get it."""
    if args.plot is None:
        return None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        return args.plot
    hint = "matplotlib is not installed: pip install 'accel-nvme[plot]'"
    if args.plot != PLOT_DEFAULT:
        parser.error(f"--plot {args.plot}: {hint}")
    print(f"no plot: {hint} (or pass --no-plot)", file=sys.stderr)
    return None


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``accel-nvme`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _run(args, parser)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(name)s: %(message)s")
    if args.command == "bench":
        _bench(args, parser)
    elif args.command == "config":
        _config(args)
    else:
        options = {}
        if args.command == "clean":
            options["dry_run"] = args.dry_run
        if args.command == "inspect":
            options["resident_budget"] = args.resident_budget
        sys.exit(maintenance.run_command(args.command, args.folder, **options))


if __name__ == "__main__":
    main()

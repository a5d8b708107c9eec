"""The ``mambazoo`` command.

    mambazoo fit --config NAME [--section.key value ...]   train (NAME: a file of configs/ without .yaml, or a path)
    mambazoo validate | test --config NAME --ckpt_path PATH
    mambazoo list [--models]                                 named configs (or registry models), one line each
    mambazoo generate --checkpoint PATH|NAME --prompt TEXT   sample from a trained language model

Errors in the input (unknown config, missing data, bad shapes) print one line; set
MAMBAZOO_TRACEBACK=1 for the traceback.

fit / validate / test are Lightning's CLI (LightningCLI): every key of the YAML can be overridden on
the command line (``--trainer.max_steps 100``, ``--model.init_args.lr 1e-3``), multi-GPU through
``--trainer.devices`` / ``--trainer.strategy ddp|fsdp``. A run writes to runs/NAME (``--run_dir``):
CSV and TensorBoard logs, checkpoints/last.ckpt and the best one (written atomically), curves.png.
``--ckpt_path last`` resumes the run exactly.
"""

from __future__ import annotations

import difflib
import os
import sys
import time
from pathlib import Path

from mambazoo.errors import NonFiniteLossError

def _config_dir() -> Path:
    """$MAMBAZOO_CONFIGS, else the configs shipped with the package: mambazoo/configs/ in an installed
    wheel, the repository's configs/ (beside zoo/) in a checkout installed with ``pip install -e``."""
    if os.environ.get("MAMBAZOO_CONFIGS"):
        return Path(os.environ["MAMBAZOO_CONFIGS"])
    package = Path(__file__).resolve().parent
    for candidate in (package / "configs", package.parent / "configs"):
        if candidate.is_dir():
            return candidate
    return package / "configs"


CONFIG_DIR = _config_dir()
LIGHTNING_COMMANDS = ("fit", "validate", "test")


# -- named configs -------------------------------------------------------------------------------
def config_names() -> list[str]:
    """Names of the YAML files in configs/ (without .yaml), sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []


def config_description(path: Path) -> str:
    """The first comment line of a config file."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def resolve_config(name: str) -> Path:
    """A path to an existing file, or NAME of configs/NAME.yaml. Unknown names raise ValueError
    listing the close matches."""
    p = Path(name)
    if p.is_file():
        return p
    q = CONFIG_DIR / f"{name}.yaml"
    if q.is_file():
        return q
    names = config_names()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known configs: {', '.join(names)}"
    raise ValueError(f"unknown config {name!r} (no such file, nor {q}); {hint} (`mambazoo list` shows all)")


def _rewrite_configs(args: list[str]) -> tuple[list[str], str | None]:
    """Replace each ``--config NAME`` by its resolved path; return the args and the first config's name."""
    out, first, i = [], None, 0
    while i < len(args):
        a = args[i]
        if a == "--config" and i + 1 < len(args):
            path, i = resolve_config(args[i + 1]), i + 2
        elif a.startswith("--config="):
            path, i = resolve_config(a.split("=", 1)[1]), i + 1
        else:
            out.append(a)
            i += 1
            continue
        out += ["--config", str(path)]
        first = first or path.stem
    return out, first


# -- the Lightning CLI ---------------------------------------------------------------------------
def _make_cli_class():
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.loggers import CSVLogger

    from mambazoo.tasks.checkpointing import AtomicCheckpointIO, CurvesPNG, LastCheckpoint

    class ZooCLI(LightningCLI):
        """LightningCLI with the zoo's run folder, loggers, checkpoints and curves."""

        run_name = "run"

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--run_dir", type=str, default=f"runs/{self.run_name}",
                                help="logs, checkpoints and curves.png go here")
            parser.add_argument("--monitor", type=str, default="val/loss", help="metric that picks the best checkpoint")
            parser.add_argument("--monitor_mode", type=str, default="min", help="min or max")
            parser.add_argument("--checkpoint_every_n_steps", type=int | None, default=None,
                                help="also save last.ckpt every N steps (default: after each validation)")
            parser.add_argument("--test_after_fit", type=bool, default=False, help="run the test set on the best checkpoint")
            parser.add_argument("--threads", type=int | None, default=None,
                                help="torch CPU threads (1 is fastest for tiny models on a busy 2-core CPU)")

        def before_instantiate_classes(self) -> None:
            threads = self._cfg()["threads"]
            if threads:
                import torch

                torch.set_num_threads(threads)

        def _cfg(self):
            return self.config[self.subcommand] if self.subcommand else self.config

        def instantiate_trainer(self, **kwargs):
            cfg = self._cfg()
            run_dir = Path(cfg["run_dir"])
            trainer_cfg = dict(self._get(self.config_init, "trainer", default={}))
            if trainer_cfg.get("logger") in (None, True):
                loggers = [CSVLogger(run_dir, name="logs")]
                try:
                    from lightning.pytorch.loggers import TensorBoardLogger
                    import tensorboard  # noqa: F401

                    loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version=loggers[0].version))
                except ImportError:
                    pass
                trainer_cfg["logger"] = loggers
            if trainer_cfg.get("default_root_dir") is None:
                trainer_cfg["default_root_dir"] = str(run_dir)
            plugins = trainer_cfg.get("plugins") or []
            plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
            trainer_cfg["plugins"] = plugins + [AtomicCheckpointIO()]
            ckpt_dir = run_dir / "checkpoints"
            # last.ckpt (after each validation and every N steps), and the best one by the monitor
            self.last_ckpt = LastCheckpoint(ckpt_dir, every_n_train_steps=cfg["checkpoint_every_n_steps"])
            self.best_ckpt = ModelCheckpoint(dirpath=ckpt_dir, filename="best-step{step}", monitor=cfg["monitor"],
                                             mode=cfg["monitor_mode"], save_top_k=1, auto_insert_metric_name=False)
            ours = [self.last_ckpt, self.best_ckpt, CurvesPNG(run_dir / "curves.png", title=run_dir.name)]
            extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
            return self._instantiate_trainer({**trainer_cfg, **kwargs}, extra + ours)

        def before_fit(self) -> None:
            self._t0 = time.time()

        def after_fit(self) -> None:
            trainer = self.trainer
            if trainer.global_rank == 0:
                shown = {k: float(v) for k, v in trainer.callback_metrics.items()
                         if k.split("/")[0].startswith("val") and v.numel() == 1}
                print(f"fit done in {time.time() - self._t0:.1f} s, {trainer.global_step} steps; "
                      + ", ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items()))
                      + f"\ncheckpoints: last {self.last_ckpt.last_model_path or '-'}, best {self.best_ckpt.best_model_path or '-'}",
                      flush=True)
            if self._cfg()["test_after_fit"]:
                best = self.best_ckpt.best_model_path or self.last_ckpt.last_model_path
                trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)

    return ZooCLI


def run_lightning(args: list[str]) -> None:
    """Run fit / validate / test through the zoo's LightningCLI (args start with the subcommand)."""
    import lightning.pytorch as pl

    import mambazoo.data  # noqa: F401  (datamodules importable by short class_path)
    import mambazoo.tasks  # noqa: F401

    args, name = _rewrite_configs(args)
    cls = _make_cli_class()
    cls.run_name = name or "run"
    # The arguments go in as the command line (LightningCLI warns when given both `args` and one).
    argv, sys.argv = sys.argv, [sys.argv[0] if sys.argv else "mambazoo"] + args
    try:
        cls(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
            save_config_kwargs={"overwrite": True}, seed_everything_default=0, parser_kwargs={"default_env": False})
    finally:
        sys.argv = argv


# -- list and generate ---------------------------------------------------------------------------
def cmd_list(args: list[str]) -> None:
    if "--models" in args:
        import mambazoo

        for m in mambazoo.list_models():
            print(f"{m:24s} {mambazoo.describe_model(m)}")
        return
    for n in config_names():
        print(f"{n:28s} {config_description(CONFIG_DIR / f'{n}.yaml')}")


def load_task(checkpoint: str, map_location="cpu"):
    """A CausalLMTask from a checkpoint file, or from NAME -> runs/NAME/checkpoints/last.ckpt. The file is read
    with weights_only=True: a checkpoint holding pickled code is refused (ValueError naming it), not run."""
    from mambazoo.tasks import CausalLMTask
    from mambazoo.textgen import torch_load_safely

    p = Path(checkpoint)
    if not p.is_file():
        guess = Path("runs") / checkpoint / "checkpoints" / "last.ckpt"
        if not guess.is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint!r} not found (nor {guess}); train one with "
                                    f"`mambazoo fit --config {checkpoint}`")
        p = guess
    ckpt = torch_load_safely(p, map_location)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{p}: expected a Lightning checkpoint (a dict with 'state_dict' and 'hyper_parameters')")
    hp = dict(ckpt.get("hyper_parameters") or {})
    if "model" not in hp or "bytes_per_token" not in hp:
        raise ValueError(f"{p} is not a checkpoint of a language-model task (CausalLMTask)")
    import inspect

    known = inspect.signature(CausalLMTask.__init__).parameters
    task = CausalLMTask(**{k: v for k, v in hp.items() if k in known})
    try:
        task.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"{p}: the weights do not fit the model its hyper-parameters name "
                         f"({str(e).splitlines()[0]})") from e
    return task.eval(), p


def cmd_generate(args: list[str]) -> None:
    """``mambazoo generate (--model NAME_OR_PATH | --checkpoint CKPT) --prompt TEXT``: new tokens are printed as
    they come (text with the model's tokenizer, else comma-separated ids)."""
    import argparse
    import math

    import torch

    from mambazoo.generation import stream_generate
    from mambazoo.textgen import TextOut, device_from_arg, prompt_ids

    ap = argparse.ArgumentParser(prog="mambazoo generate", description="sample from a language model")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a Hub repo id (org/name), a zoo name with known weights, or a local folder")
    src.add_argument("--checkpoint", help="a .ckpt file, or a config NAME (runs/NAME/checkpoints/last.ckpt)")
    ap.add_argument("--revision", default=None, help="branch, tag or commit of the Hub repo (with --model)")
    ap.add_argument("--prompt", default="", help="text (models with a tokenizer), or comma-separated token ids")
    ap.add_argument("--max_new_tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top_k", type=int, default=None)
    ap.add_argument("--top_p", type=float, default=None)
    ap.add_argument("--repetition_penalty", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(args)
    if not math.isfinite(a.temperature) or a.temperature < 0:
        raise ValueError(f"--temperature: expected a finite number >= 0 (0 = greedy), got {a.temperature}")
    if a.max_new_tokens < 0:
        raise ValueError(f"--max_new_tokens: expected an int >= 0, got {a.max_new_tokens}")
    device = device_from_arg(a.device)
    torch.manual_seed(a.seed)
    if a.model is not None:
        from mambazoo.hub import from_pretrained

        model = from_pretrained(a.model, a.revision)
        tokenizer = getattr(model, "tokenizer", None)
    else:
        task, _ = load_task(a.checkpoint)
        model = task.model
        tokenizer = None
        if task.codec is not None:
            from mambazoo.mambabyte.tokenizer import ByteTokenizer

            tokenizer = ByteTokenizer()
    if not hasattr(model, "generate"):
        raise ValueError(f"{a.model or a.checkpoint}: not a language model ({type(model).__name__}); generate "
                         "needs one")
    model = model.to(device).eval()
    ids = prompt_ids(a.prompt, tokenizer)
    if not ids:
        bos = getattr(tokenizer, "bos_token_id", None)
        ids = [bos] if bos is not None else [ord("\n")] if tokenizer is not None and model.config.vocab_size == 256 else [0]
    x = torch.tensor([ids], dtype=torch.long, device=device)
    eos = getattr(tokenizer, "eos_token_id", None)
    out = sys.stdout
    if tokenizer is not None:
        out.write(a.prompt if tokenizer.__class__.__name__ != "ByteTokenizer" else
                  os.fsencode(a.prompt).decode("utf-8", errors="replace"))
        out.flush()
        printer = TextOut(tokenizer, out)
    else:
        out.write(",".join(map(str, ids)))
        out.flush()
    for tok in stream_generate(model, x, a.max_new_tokens, a.temperature, a.top_k, a.top_p, eos,
                               repetition_penalty=a.repetition_penalty):
        t = int(tok[0])
        if tokenizer is not None:
            printer.put(t)
        else:
            out.write(f",{t}")
            out.flush()
    if tokenizer is not None:
        printer.end()
    else:
        out.write("\n")


# -- entry point ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "list":
            cmd_list(rest)
        elif cmd == "generate":
            cmd_generate(rest)
        elif cmd in LIGHTNING_COMMANDS:
            run_lightning(argv)
        else:
            raise ValueError(f"unknown command {cmd!r}; expected one of fit, validate, test, list, generate")
    except NonFiniteLossError as e:
        print(f"mambazoo: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader went away (`mambazoo list | head`): not an error
        sys.stderr.close()
        return 0
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("MAMBAZOO_TRACEBACK"):
            raise
        print(f"mambazoo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

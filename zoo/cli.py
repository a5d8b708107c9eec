"""The ``mambazoo`` command.

    mambazoo fit --config NAME [--section.key value ...]   train (NAME: a file of configs/ without .yaml, or a path)
    mambazoo validate | test --config NAME --ckpt_path PATH
    mambazoo list [--models]                                 named configs (or registry models), one line each
    mambazoo generate --checkpoint PATH|NAME --prompt TEXT   sample from a trained language model
    mambazoo backend                                         which implementation runs each op here, and why

Errors in the input (unknown config, missing data, bad shapes) print one line; set
MAMBAZOO_TRACEBACK=1 for the traceback.

fit / validate / test are Lightning's CLI (LightningCLI): every key of the YAML can be overridden on
the command line (``--trainer.max_steps 100``, ``--model.init_args.lr 1e-3``), multi-GPU through
``--trainer.devices`` / ``--trainer.strategy ddp|fsdp``. A run writes to its run folder (``--run_dir``, else
``--trainer.default_root_dir``, else runs/NAME): CSV and TensorBoard logs, checkpoints/last.ckpt and the best
one (written atomically), curves.png. last.ckpt always holds the latest step: it is written after each
validation, every ``--checkpoint_every_n_steps``, and whenever training stops (the end, max_time, early
stopping, SIGTERM, an exception). ``fit`` into a folder that holds checkpoints is refused unless it resumes
(``--ckpt_path last``) or starts over (``--overwrite true``).

Resuming (``--ckpt_path last`` or a path) is exact: weights, optimizer and schedule position come from
the checkpoint (the streamed text and synthetic data also resume their batch order), and so do the
task's settings, except those given on the command line, which are applied (``--model.init_args.lr 1e-5`` reaches the optimizer); each difference is printed. A longer
``--trainer.max_steps`` keeps the schedule's length (the learning rate stays at its minimum) unless
``--model.init_args.schedule_steps`` stretches it. A checkpoint of another model, or a command line that
changes the architecture, is refused. ``--optimizer`` / ``--lr_scheduler`` replace the task's AdamW /
schedule and keep its weight-decay split (decay on matrices only).
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
        if not path.read_text().strip() or path.read_text().strip() in ("---", "{}", "null", "~"):
            raise ValueError(f"{path}: an empty config; expected YAML with at least model: and data: sections "
                             "(see `mambazoo list` and configs/*.yaml)")
        out += ["--config", str(path)]
        first = first or path.stem
    return out, first


# -- the Lightning CLI ---------------------------------------------------------------------------
# model settings that define the architecture: a checkpoint's are kept on resume, and a command line that
# changes them is refused (everything else given on the command line is applied on resume)
ARCHITECTURE_KEYS = ("model", "model_kwargs", "num_classes", "tokenizer", "bytes_per_token")


def _explicit_keys(argv: list[str], prefixes: tuple[str, ...] = ("--model.init_args.", "--model.")) -> set[str]:
    """Names of the model settings given on the command line (``--model.init_args.lr 1e-5`` -> 'lr')."""
    keys = set()
    for a in argv:
        for p in prefixes:
            if a.startswith(p):
                keys.add(a[len(p):].split("=", 1)[0].split(".", 1)[0])
                break
    return keys - {"class_path", "init_args"}


def _resolve_class(path: str):
    """The class a class_path names ('mambazoo.tasks.CausalLMTask' and 'mambazoo.tasks.lm.CausalLMTask' are one),
    or the string itself when it cannot be imported."""
    import importlib

    module, _, name = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return path


def _same(a, b) -> bool:
    norm = (lambda v: list(v) if isinstance(v, (list, tuple)) else v)
    return norm(a) == norm(b)


def _make_cli_class():
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.loggers import CSVLogger

    from mambazoo.tasks.checkpointing import AtomicCheckpointIO, CurvesPNG, ZooCheckpoint, remove_orphan_temporaries

    class ZooCLI(LightningCLI):
        """LightningCLI with the zoo's run folder, loggers, checkpoints and curves."""

        run_name = "run"
        argv: list[str] = []

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--run_dir", type=str | None, default=None,
                                help="logs, checkpoints and curves.png go here (default: --trainer.default_root_dir "
                                     f"when given, else runs/{self.run_name})")
            parser.add_argument("--monitor", type=str, default="val/loss", help="metric that picks the best checkpoint")
            parser.add_argument("--monitor_mode", type=str, default="min", help="min or max")
            parser.add_argument("--checkpoint_every_n_steps", type=int | None, default=None,
                                help="also save last.ckpt every N steps (default: after each validation and at the end)")
            parser.add_argument("--test_after_fit", type=bool, default=False, help="run the test set on the best checkpoint")
            parser.add_argument("--threads", type=int | None, default=None,
                                help="torch CPU threads (1 is fastest for tiny models on a busy 2-core CPU)")
            parser.add_argument("--overwrite", type=bool, default=False,
                                help="fit: start over in a run folder that already holds checkpoints (deletes them)")

        # -- the run folder, resuming --------------------------------------------------------------
        def _run_dir(self, cfg) -> Path:
            """--run_dir, else --trainer.default_root_dir, else runs/NAME."""
            root = (cfg.get("trainer") or {}).get("default_root_dir")
            return Path(cfg.get("run_dir") or root or f"runs/{self.run_name}")

        def _parse_ckpt_path(self) -> None:
            """Before the classes are built: check the run folder and decide what ``--ckpt_path`` restores.

            fit into a folder with checkpoints needs ``--ckpt_path last`` (resume) or ``--overwrite true``;
            ``--ckpt_path last`` needs a last.ckpt. A checkpoint's task settings are restored (an exact resume),
            except those given on the command line, which are applied (``ZooTask.apply_resume_overrides``);
            a checkpoint of another model, or a command line that changes the architecture, is refused."""
            sub = self.config.get("subcommand")
            if not sub:
                return
            cfg = self.config[sub]
            ckpt_path = cfg.get("ckpt_path")
            ckpt_dir = self._run_dir(cfg) / "checkpoints"
            if sub == "fit":
                for f in remove_orphan_temporaries(ckpt_dir):
                    print(f"removed {f} (left by a save that was killed)", flush=True)
                self._check_run_folder(cfg, ckpt_dir, ckpt_path)
            if ckpt_path == "last" and sub == "fit":
                last = ckpt_dir / "last.ckpt"
                if not last.is_file():
                    raise ValueError(f"--ckpt_path last: nothing to resume, {last} does not exist; drop --ckpt_path "
                                     "to start a new run, or give the path of a checkpoint")
                ckpt_path = cfg["ckpt_path"] = str(last)
            if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
                return
            if not Path(ckpt_path).is_file():
                raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such file (expected a .ckpt written by "
                                        "`mambazoo fit`, or 'last' to resume the run in --run_dir)")
            self._merge_checkpoint_settings(sub, cfg, Path(ckpt_path))

        def _check_run_folder(self, cfg, ckpt_dir: Path, ckpt_path) -> None:
            existing = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
            if not existing or ckpt_path:
                return
            if cfg.get("overwrite"):
                for f in existing:
                    f.unlink()
                print(f"--overwrite: deleted {len(existing)} checkpoint(s) of the previous run in {ckpt_dir}", flush=True)
                return
            from mambazoo.errors import RunExistsError

            raise RunExistsError(
                f"{ckpt_dir} already holds checkpoints ({', '.join(f.name for f in existing[:4])}): resume that run "
                "with --ckpt_path last, or start over with another --run_dir or with --overwrite true (deletes them)")

        def _merge_checkpoint_settings(self, sub: str, cfg, path: Path) -> None:
            from mambazoo.errors import WeightsFileError
            from mambazoo.weights_io import describe_object, load_file

            ckpt = load_file(path)
            if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
                raise WeightsFileError(f"--ckpt_path {path}: expected a Lightning checkpoint (.ckpt written by "
                                       f"`mambazoo fit`), found {describe_object(ckpt)}")
            hp = dict(ckpt.get("hyper_parameters") or {})
            hp.pop("_instantiator", None)
            class_path = hp.pop("_class_path", None)
            model_cfg = cfg.get("model")
            if not hp or model_cfg is None or not hasattr(model_cfg, "init_args"):
                return
            current = dict(vars(model_cfg.init_args)) if not isinstance(model_cfg.init_args, dict) else dict(model_cfg.init_args)
            if class_path and _resolve_class(class_path) is not _resolve_class(model_cfg.class_path):
                raise ValueError(f"--ckpt_path {path}: a {class_path} checkpoint, but the config builds a "
                                 f"{model_cfg.class_path}; use the config that trained it")
            if "model" in hp and "model" in current and hp["model"] != current["model"]:
                raise ValueError(f"--ckpt_path {path}: a checkpoint of {hp['model']!r}, but the config builds "
                                 f"{current['model']!r}; use --config {hp['model']} (or the config that trained it)")
            explicit, merged, notes = _explicit_keys(self.argv), {}, []
            for k, v in hp.items():
                if k not in current:
                    continue
                new = current[k]
                if k in explicit and not _same(new, v):
                    if k in ARCHITECTURE_KEYS:
                        raise ValueError(f"--model.init_args.{k}: {path} was trained with {v!r}, and the "
                                         f"architecture cannot change on resume (got {new!r})")
                    merged[k] = new
                else:
                    merged[k] = v
                    if not _same(new, v) and k not in ARCHITECTURE_KEYS:
                        notes.append(f"resume: {k} stays {v!r} as in the checkpoint (the config says {new!r}; "
                                     f"--model.init_args.{k} on the command line changes it)")
            self.config = self.parser.parse_object(
                {sub: {"model": {"class_path": model_cfg.class_path, "init_args": merged}}}, self.config)
            for line in notes:
                print(line, flush=True)

        # -- classes -------------------------------------------------------------------------------
        def before_instantiate_classes(self) -> None:
            threads = self._cfg()["threads"]
            if threads is not None:
                if threads < 1:
                    raise ValueError(f"--threads: expected a positive int, got {threads}")
                import torch

                torch.set_num_threads(threads)

        def _cfg(self):
            return self.config[self.subcommand] if self.subcommand else self.config

        def instantiate_trainer(self, **kwargs):
            cfg = self._cfg()
            trainer_cfg = dict(self._get(self.config_init, "trainer", default={}))
            run_dir = self._run_dir({"run_dir": cfg["run_dir"], "trainer": trainer_cfg})
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
            # one ModelCheckpoint: the best by the monitor, and last.ckpt after each validation, every N steps
            # and whenever training stops; a user's own ModelCheckpoint (--trainer.callbacks) runs beside it
            self.ckpt = ZooCheckpoint(run_dir / "checkpoints", monitor=cfg["monitor"], mode=cfg["monitor_mode"],
                                      every_n_train_steps=cfg["checkpoint_every_n_steps"])
            ours = [self.ckpt, CurvesPNG(run_dir / "curves.png", title=run_dir.name, logs_dir=run_dir / "logs")]
            extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
            return self._instantiate_trainer({**trainer_cfg, **kwargs}, extra + ours)

        def _add_configure_optimizers_method_to_model(self, subcommand) -> None:
            """``--optimizer`` / ``--lr_scheduler`` replace the task's AdamW / warmup-cosine schedule, keeping the
            weight-decay split (``mambazoo.tasks.optim``): decay (the optimizer's weight_decay) on matrices only."""
            import types

            from lightning.pytorch.cli import instantiate_class

            from mambazoo.tasks.optim import param_groups

            opt_init = self._get(self.config_init, "optimizer", default=None)
            sched_init = self._get(self.config_init, "lr_scheduler", default=None)
            if not opt_init and not sched_init:
                return
            model, cli = self.model, self
            builtin = type(model).configure_optimizers

            def configure_optimizers(module):
                if opt_init:
                    wd = (opt_init.get("init_args") or {}).get("weight_decay", 0.0)
                    opt = instantiate_class(param_groups(module.model, wd), opt_init)
                    print(f"--optimizer {opt_init['class_path'].rsplit('.', 1)[-1]} replaces the task's AdamW "
                          f"(--model.init_args lr / weight_decay / betas are not used) and its warmup + cosine "
                          f"schedule ({'see --lr_scheduler' if sched_init else 'a constant learning rate now'}); "
                          f"weight decay {wd} on matrices only, as the task's", flush=True)
                else:
                    opt = builtin(module)["optimizer"]
                if not sched_init:
                    return opt if opt_init else builtin(module)
                sched = instantiate_class(opt, sched_init)
                print(f"--lr_scheduler {sched_init['class_path'].rsplit('.', 1)[-1]} replaces the task's warmup + "
                      "cosine schedule (stepped once per epoch, Lightning's default)", flush=True)
                return cli.configure_optimizers(module, opt, sched)

            model.configure_optimizers = types.MethodType(configure_optimizers, model)

        def before_fit(self) -> None:
            self._t0 = time.time()

        def after_fit(self) -> None:
            trainer = self.trainer
            if trainer.global_rank == 0:
                shown = {k: float(v) for k, v in trainer.callback_metrics.items()
                         if k.split("/")[0].startswith("val") and v.numel() == 1}
                print(f"fit done in {time.time() - self._t0:.1f} s, {trainer.global_step} steps; "
                      + ", ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items()))
                      + f"\ncheckpoints: last {self.ckpt.last_model_path or '-'} (step {self.ckpt.last_step}), "
                      + f"best {self.ckpt.best_model_path or '-'}", flush=True)
            if self._cfg()["test_after_fit"]:
                best = self.ckpt.best_model_path or self.ckpt.last_model_path
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
    cls.argv = list(args)
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
    from mambazoo.weights_io import load_file

    p = Path(checkpoint)
    if not p.is_file():
        guess = Path("runs") / checkpoint / "checkpoints" / "last.ckpt"
        if not guess.is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint!r} not found (nor {guess}); train one with "
                                    f"`mambazoo fit --config {checkpoint}`")
        p = guess
    ckpt = load_file(p, map_location)  # weights_only: never runs pickled code
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
        elif cmd == "backend":
            if rest:
                raise ValueError(f"backend: expected no arguments (set MAMBAZOO_* variables), got {' '.join(rest)}")
            from mambazoo.core.backend import describe_backend

            print(describe_backend())
        elif cmd in LIGHTNING_COMMANDS:
            run_lightning(argv)
        else:
            raise ValueError(f"unknown command {cmd!r}; expected one of fit, validate, test, list, generate, backend")
    except NonFiniteLossError as e:
        print(f"mambazoo: {e}", file=sys.stderr)
        return 1
    except SystemExit as e:
        if type(e).__name__ != "SIGTERMException":  # Lightning's, raised at the step after a SIGTERM
            raise
        print("mambazoo: stopped by SIGTERM; last.ckpt holds the last completed step: resume with --ckpt_path last",
              file=sys.stderr)
        return 143
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

"""`Checkpointer`: periodic, atomic, optionally asynchronous saves of a state pytree + JSON."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from rlhf_jax.checkpointing.trees import Names, abstract_state, flat, named_leaves, nest
from rlhf_jax.errors import RlhfJaxError

_STATE, _META = "state", "meta"
FORMAT = 1  # bump when the layout of `state` / `meta` changes


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


# How tensorstore (orbax's array writer) reports the OS error under its own message.
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='?(\d+)")


def _os_errno(err: BaseException) -> int | None:
    """The OS error number behind a failed save (an OSError anywhere in the chain, or the
    code tensorstore quotes), or None."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno:
            return err.errno
        found = _TENSORSTORE_ERRNO.search(str(err))
        if found:
            return int(found.group(1))
        err = err.__cause__ or err.__context__
    return None


def _save_reason(err: BaseException) -> str:
    """One line: the OS's reason and errno (`No space left on device (ENOSPC, errno 28)`),
    or the first line of the error when it carries none."""
    code = _os_errno(err)
    if code is not None:
        return f"{os.strerror(code)} ({errno.errorcode.get(code, '?')}, errno {code})"
    first = (_describe(err).splitlines() or [""])[0]
    return "(disk full or folder not writable?) " + (
        first if len(first) <= 300 else first[:297] + "..."
    )


class _DropReportedOrbaxFailures(logging.Filter):
    """Orbax logs each failure of a save with its traceback (one log from each thread the
    failure passes through: 300 lines for one full disk), then raises it, and the
    Checkpointer turns what it raises into one line. Those logs (orbax errors that carry a
    traceback) are dropped; other orbax messages pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_orbax = f"{os.sep}orbax{os.sep}" in record.pathname
        return not (from_orbax and record.levelno >= logging.ERROR and record.exc_info)


_ORBAX_FILTER = _DropReportedOrbaxFailures()


class Checkpointer:
    """Saves and restores a training state pytree plus a JSON meta dict, one folder per step.

    directory: the run's checkpoint folder (a local path or an orbax/epath URL).
    save_every: `save` writes when `step % save_every == 0` (or `force`); 0 = only forced.
    keep: how many of the newest checkpoints to keep; older ones are deleted once a newer one
        is committed, never before.
    async_save: `save` returns as soon as the arrays are copied off the devices (the caller
        may donate or overwrite its state right away) and writes in a background thread; the
        next `save`, `wait`, `restore` or `close` waits for it and raises its error, if any.
    read_only: only restore (no folder creation, no cleanup); a missing folder is an error.

    Problems the user can fix (folder not writable, disk full, checkpoint missing or from
    another model) raise `RlhfJaxError`. A failed save changes neither the caller's state nor
    the committed checkpoints.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        save_every: int,
        keep: int,
        async_save: bool = True,
        *,
        read_only: bool = False,
    ):
        for name, value, low in (("save_every", save_every, 0), ("keep", keep, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise RlhfJaxError(f"checkpoint {name} must be an integer >= {low}, got {value!r}")
        text = os.fspath(directory)
        self.directory = epath.Path(text if "://" in text else os.path.abspath(text))
        self.save_every, self.keep, self.read_only = save_every, keep, read_only
        self._missing = not self.directory.exists()  # to tell "missing" from "empty"
        if self._missing and read_only:
            raise RlhfJaxError(f"checkpoint folder {self.directory} does not exist")
        if not read_only:
            self._check_writable()
        absl_logger = logging.getLogger("absl")  # orbax logs through absl
        if _ORBAX_FILTER not in absl_logger.filters:
            absl_logger.addFilter(_ORBAX_FILTER)
        self._pending: int | None = None  # step of an async save not waited for yet
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=False,  # done by _check_writable
            read_only=read_only,
            cleanup_tmp_directories=not read_only,  # saves a killed process left unfinished
            enable_async_checkpointing=async_save,
            # Make the step folder before `save` returns, so an unwritable folder fails there
            # (made in the background, the writer threads would only notice after a timeout).
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        )
        handlers = {_STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()}
        try:
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_handlers=handlers
            )
        except OSError as err:
            raise RlhfJaxError(
                f"cannot open checkpoint folder {self.directory}: {_describe(err)}"
            ) from err

    def _check_writable(self) -> None:
        """Fail at start-up, not at the first save hours later."""
        if self.directory.exists() and not self.directory.is_dir():
            raise RlhfJaxError(f"checkpoint folder {self.directory} is a file, not a folder")
        probe = self.directory / f".write-test-{jax.process_index()}-{os.getpid()}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise RlhfJaxError(
                f"cannot write checkpoints to {self.directory}: {_describe(err)}"
            ) from err

    # -- queries -------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps of the checkpoints in the folder (with one an async save is still writing)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest checkpoint's step, None when there is none (call `wait` first to count
        only committed ones while an async save runs)."""
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.save_every > 0 and step % self.save_every == 0

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    # -- save ----------------------------------------------------------------------------------

    def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
        """Save `state` and `meta` as checkpoint `step` when due (or `force`); True if saved.

        A step that is already saved is not saved again (False). Every process must call this
        with the same steps. With async_save, an error of the write surfaces at the next
        `save`/`wait`/`close`.
        """
        if self.read_only:
            raise RlhfJaxError(f"checkpoint folder {self.directory} was opened read-only")
        if not (force or self.should_save(step)):
            return False
        self.wait()  # the previous save's error, if any, before starting another
        if step in self._manager.all_steps():
            return False
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as err:
            raise TypeError(f"checkpoint meta must be JSON-serializable: {err}") from err
        named, _ = named_leaves(state)
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(nest(named)),
                _META: ocp.args.JsonSave({"format": FORMAT, "step": step, "meta": meta}),
            }
        )
        try:
            self._manager.save(step, args=args, force=True)
        except Exception as err:
            raise self._save_error(step, err) from err
        self._pending = step
        return True

    def _save_error(self, step: int | None, err: BaseException) -> RlhfJaxError:
        # The manager dropped the steps this save was to replace from its list; re-read the
        # folder so that `latest_step` names the newest checkpoint really there again.
        self._manager.reload()
        latest = self.latest_step()
        if latest is None:
            kept = "there is no earlier checkpoint"
        else:
            kept = f"the latest checkpoint is still step {latest}"
        what = "a checkpoint" if step is None else f"checkpoint step {step}"
        return RlhfJaxError(
            f"could not save {what} to {self.directory}: {_save_reason(err)}; the training "
            f"state is unchanged and {kept}"
        )

    def wait(self) -> None:
        """Block until an async save is committed; RlhfJaxError if it failed."""
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as err:
            raise self._save_error(step, err) from err

    def close(self) -> None:
        """Wait for the last save (raising its error) and stop orbax's threads."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- restore -------------------------------------------------------------------------------

    def _pick_step(self, step: int | None) -> int:
        self.wait()
        steps = self.all_steps()
        if not steps:
            if self._missing:
                raise RlhfJaxError(f"checkpoint folder {self.directory} does not exist")
            raise RlhfJaxError(f"no complete checkpoint in {self.directory}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise RlhfJaxError(
                f"no checkpoint for step {step} in {self.directory}; found steps {steps}"
            )
        return step

    def read_meta(self, step: int | None = None) -> dict:
        """The meta of checkpoint `step` (default: the latest), without reading the arrays."""
        step = self._pick_step(step)
        where = self.step_dir(step)
        try:
            args = ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
            saved = self._manager.restore(step, args=args)[_META]
        except Exception as err:
            raise RlhfJaxError(f"cannot read checkpoint {where}: {_describe(err)}") from err
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            found = saved.get("format") if isinstance(saved, dict) else None
            raise RlhfJaxError(
                f"checkpoint {where} has format {found!r}; this version reads format {FORMAT}"
            )
        return saved["meta"]

    def restore(self, step: int | None = None, target=None, *, expect: dict | None = None):
        """`(state, meta)` of checkpoint `step` (default: the latest), shaped like `target`.

        target: what to restore into: a pytree of `jax.ShapeDtypeStruct` whose `.sharding`
            says where each leaf goes (see `abstract_state`; any mesh, not only the one that
            saved), or of arrays (their own shardings). Its structure and static fields (a
            TrainState's `tx`) are kept; each array leaf must match the checkpoint's in path,
            shape and dtype, else RlhfJaxError.
        expect: meta entries that must be equal, e.g. `{"stage": "sft", "config": hash}`.
        """
        if target is None:
            raise TypeError("restore needs a target: the state (or its abstract_state) to fill")
        step = self._pick_step(step)
        where = self.step_dir(step)
        meta = self.read_meta(step)
        mismatched = [
            f"{k}: saved {meta.get(k)!r}, expected {v!r}"
            for k, v in (expect or {}).items()
            if meta.get(k) != v
        ]
        if mismatched:
            raise RlhfJaxError(
                f"checkpoint {where} was written by a different run: " + "; ".join(mismatched)
            )
        named, treedef = named_leaves(abstract_state(target))
        self._check_compatible(step, dict(named))
        try:
            args = ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(nest(named))})
            restored = flat(self._manager.restore(step, args=args)[_STATE])
        except Exception as err:
            raise RlhfJaxError(f"cannot read checkpoint {where}: {_describe(err)}") from err
        return jax.tree.unflatten(treedef, [restored[names] for names, _ in named]), meta

    def _saved_leaves(self, step: int) -> dict[Names, Any]:
        where = self.step_dir(step)
        try:
            saved = self._manager.item_metadata(step)[_STATE]
        except Exception as err:
            raise RlhfJaxError(f"cannot read checkpoint {where}: {_describe(err)}") from err
        return flat(getattr(saved, "tree", saved))

    def saved_names(self, step: int | None = None) -> list[str]:
        """Slash-joined paths of the arrays checkpoint `step` (default: the latest) holds,
        e.g. "policy/params/embed", read from its metadata without loading them."""
        return sorted("/".join(n) for n in self._saved_leaves(self._pick_step(step)))

    def _check_compatible(self, step: int, want: dict[Names, Any]) -> None:
        saved = self._saved_leaves(step)
        where = self.step_dir(step)
        problems = [f"{'/'.join(n)}: missing from the checkpoint" for n in want if n not in saved]
        problems += [f"{'/'.join(n)}: not in the state restored" for n in saved if n not in want]
        for names in sorted(want.keys() & saved.keys()):
            got, exp = saved[names], want[names]
            got_dtype, exp_dtype = np.dtype(got.dtype), np.dtype(exp.dtype)
            if tuple(got.shape) != tuple(exp.shape) or got_dtype != exp_dtype:
                problems.append(
                    f"{'/'.join(names)}: saved {got_dtype.name}{list(got.shape)}, "
                    f"expected {exp_dtype.name}{list(exp.shape)}"
                )
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise RlhfJaxError(
                f"checkpoint {where} does not fit the state being restored (another model "
                f"shape or optimizer?): " + "; ".join(problems[:5]) + more
            )

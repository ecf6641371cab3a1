"""The `edgesplit` command. Each subcommand lives in its component and is imported only when asked for,
so that `edgesplit client` on a Raspberry Pi never loads PyTorch.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import MutableMapping
from typing import TextIO

from edgesplit.errors import EdgesplitError

# subcommand -> (module with a `main(argv)`, one-line help, pip extra it needs)
SUBCOMMANDS: dict[str, tuple[str, str, str | None]] = {
    "export": ("edgesplit.export.cli", "cut a model into an ONNX client head and a PyTorch server tail", "export"),
    "serve": ("edgesplit.server.cli", "run the cloud server (the tail) for many clients", "server"),
    "client": ("edgesplit.client.client_cli", "run an edge client (the head) against a server", None),
    "bundle": ("edgesplit.client.bundle", "copy the files a device needs out of an export", None),
    "demo": ("edgesplit.server.demo", "export, serve and train N clients on this machine", "export,server"),
    "compare": ("edgesplit.server.compare", "run split, FedLLM and KD-FedLLM on the same data", "export,server"),
    "profile": ("edgesplit.profiles.cli", "measure the cost of each cut layer on this device", "export"),
    "adapter": ("edgesplit.server.adapter", "write a run's result as a PEFT adapter (or merged weights)", "server"),
    "generate": ("edgesplit.server.hf_generate", "generate with a base model and an adapter (KV cache)", "server"),
}


def usage() -> str:
    lines = ["usage: edgesplit <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_text}" for name, (_, help_text, _) in SUBCOMMANDS.items()]
    lines += ["", "`edgesplit <command> --help` shows a command's options."]
    return "\n".join(lines)


# Seconds between two redraws of a library's progress bar written to a file rather than a terminal.
LOG_BAR_INTERVAL_S = 15


def quiet_progress_bars_off_terminal(environ: MutableMapping[str, str], stderr: TextIO) -> None:
    """Where stderr is a log file or a pipe, not a terminal, the libraries' tqdm bars (transformers' GGUF
    dequantisation and weight loading, hub downloads) redraw at most every LOG_BAR_INTERVAL_S seconds: each
    redraw is a line in a file (loading a GGUF model wrote hundreds into the demo's log), while the first and
    the last, and a long download's progress, still tell a reader of the log where the work stands. tqdm
    reads TQDM_MININTERVAL when it is first imported, so this runs before any subcommand's imports; a value
    the user set is kept. edgesplit's own bars draw only on a terminal."""
    if not stderr.isatty():
        environ.setdefault("TQDM_MININTERVAL", str(LOG_BAR_INTERVAL_S))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    quiet_progress_bars_off_terminal(os.environ, sys.stderr)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in SUBCOMMANDS:
        close = difflib.get_close_matches(command, SUBCOMMANDS, n=1)
        suggestion = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"edgesplit: unknown command {command!r}{suggestion}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, _, extra = SUBCOMMANDS[command]
    try:
        module = importlib.import_module(module_name)
        return int(module.main(rest) or 0)
    except ModuleNotFoundError as error:
        # Heavy dependencies are imported lazily, deep inside a command: a device install (no torch, no onnx)
        # meets them only there. A module of edgesplit's own that is missing is a broken install, not this.
        missing = (error.name or "").split(".")[0]
        if not missing or missing == "edgesplit":
            raise
        hint = f"pip install 'edgesplit[{extra}]'" if extra else "reinstall edgesplit"
        print(
            f"edgesplit {command}: this install lacks {missing!r}, which `edgesplit {command}` needs: {hint}",
            file=sys.stderr,
        )
        return 2
    except EdgesplitError as error:
        print(f"edgesplit {command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"edgesplit {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

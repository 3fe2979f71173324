"""Versions recorded with every result, so a number can be traced to the code and libraries behind it."""
import os
import platform
import subprocess
from typing import Dict

import torch

TOOLKIT_VERSION = "0.1.0"


def git_commit(repo_dir: str) -> str:
    try:
        out = subprocess.run(["git", "-C", repo_dir, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions(repo_dir: str = None) -> Dict[str, str]:
    repo_dir = repo_dir or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    info = {"toolkit": TOOLKIT_VERSION, "git_commit": git_commit(repo_dir), "python": platform.python_version(),
            "torch": str(torch.__version__), "cuda": str(torch.version.cuda)}
    try:
        import torchattacks
        info["torchattacks"] = str(torchattacks.__version__)
    except ImportError:
        pass
    return info

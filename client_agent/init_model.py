"""``fedseg init-model``: write the global model a federation's round 1 starts from.

The model is the configured network (``[model]`` of the federation TOML) with its own
initialisation, seeded by ``[training] seed``, saved losslessly as codec frames: the file the
aggregator's ``--initial-model`` reads. Making it needs the network's code (torch and MONAI),
which the aggregator's environment does not have: run it where the site stack is installed
(``pip install 'fedsegnet[client]'``) or in the client-agent image, as the Kubernetes manifests do.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aggregator_service.config import FederationConfig

SITE_STACK_HINT = "pip install 'fedsegnet[client]', or run it in the client-agent image (k8s/README.md, section 5)"


def require_site_stack(what: str) -> None:
    """Raise RuntimeError in one line naming the missing package when torch or MONAI is not installed."""
    try:
        import model  # noqa: F401  (imports torch and MONAI)
    except ImportError as exc:
        missing = exc.name or str(exc)
        raise RuntimeError(f"{what} needs the site's training stack ({missing} is not installed): {SITE_STACK_HINT}") from None


def write_initial_model(config: FederationConfig, out: Path) -> Path:
    """The global model round 1 starts from: the configured network, initialised from the seed."""
    import torch

    import codec
    from model import build_model

    torch.manual_seed(config.training.seed)
    m = config.model
    net = build_model(m.architecture, in_channels=m.in_channels, out_channels=m.out_channels,
                      img_size=m.img_size, **dict(m.options))
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = ((k, v.detach().cpu().numpy()) for k, v in net.state_dict().items())
    codec.save_tensors(out, tensors, codec.LOSSLESS)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="federation TOML")
    parser.add_argument("--out", required=True, help="model file to write")


def run(args: argparse.Namespace) -> int:
    from aggregator_service.config import load_federation_config

    config = load_federation_config(args.config)
    require_site_stack("fedseg init-model")
    path = write_initial_model(config, Path(args.out))
    print(f"wrote {path}")
    return 0

"""CapsNet and the paper's baseline CNN."""
from capstf.model.baseline import BaselineCNN
from capstf.model.capsnet import CapsNet


def build_model(cfg, jit_routing=True, precision="float32"):
    """The model named by cfg.kind ("capsnet" or "baseline"), built and ready to call."""
    if cfg.kind == "baseline":
        return BaselineCNN(cfg, precision)
    return CapsNet(cfg, jit_routing=jit_routing, precision=precision)

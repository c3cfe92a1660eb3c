"""CapsNet and the CNNs it is compared with."""
from capstf.model.baseline import BaselineCNN
from capstf.model.capsnet import CapsNet


def build_model(cfg, jit_routing=True, precision="float32", forward_conv_gradients=True):
    """The model named by cfg.kind ("capsnet", or a CNN of `capstf.model.baseline`), built and ready to call.

    jit_routing, forward_conv_gradients: CapsNet only (see CapsNet).
    """
    if cfg.kind != "capsnet":
        return BaselineCNN(cfg, precision)
    return CapsNet(cfg, jit_routing=jit_routing, precision=precision, forward_conv_gradients=forward_conv_gradients)

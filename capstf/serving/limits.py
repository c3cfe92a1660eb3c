"""What one `capstf serve` takes on at most (light: the CLI reads the defaults without TensorFlow)."""
import dataclasses


@dataclasses.dataclass(frozen=True)
class Limits:
    max_concurrent_rpcs: int = 64                # in flight or queued; beyond them RESOURCE_EXHAUSTED
    max_message_bytes: int = 16 * 1024 * 1024    # 1,024 MultiMNIST images in float32 take 5.3 MB
    max_images: int = 1024                       # per request; beyond them INVALID_ARGUMENT

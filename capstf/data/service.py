"""Generation on other machines: TensorFlow's tf.data service, for when one host's cores cannot
feed its accelerators.

    capstf data-service dispatcher --port 5050                          # one, anywhere
    capstf data-service worker --dispatcher HOST:5050 --port 5051        # on each spare host
    capstf train --dataset multimnist --data-service grpc://HOST:5050    # as usual otherwise

The trainer sends its input pipeline (the digits and the generating functions) to the dispatcher,
and workers run it. Every example is a function of its position in the stream, and the
pipeline's source is that stream of positions, so the dispatcher can hand the positions out to
the workers itself (ShardingPolicy.DYNAMIC): each position goes to one worker, and each example
is generated and trained on once, however many workers there are and whatever their speed. The
guarantee is at most once: a worker that fails loses the few examples it was making. Each of the
trainer's input pipelines (one per training host) is its own job over its own positions.
"""
import socket

import grpc
import tensorflow as tf

from capstf.errors import CapstfError, RuntimeFailure, first_line

def check_reachable(service: str, timeout_s: float = 10.0):
    """tf.data service retries an unreachable dispatcher for a long time without a word: fail at
    once instead, with the address. `service`: grpc://HOST:PORT (train.data_service, checked)."""
    with grpc.insecure_channel(service.removeprefix("grpc://")) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise RuntimeFailure(f"The tf.data service dispatcher {service} did not answer within "
                                 f"{timeout_s:.0f} s (is `capstf data-service dispatcher` running there?).") from None


def generated_by_service(dataset: tf.data.Dataset, service: str) -> tf.data.Dataset:
    """`dataset`, generated on the service's workers; each of its source's elements is given to
    exactly one worker (without failures)."""
    return dataset.apply(tf.data.experimental.service.distribute(
        processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC, service=service))


def start_dispatcher(port: int) -> tf.data.experimental.service.DispatchServer:
    """The dispatcher, on `port` (0: any free one; its `target` says which)."""
    return _started("dispatcher", port, lambda: tf.data.experimental.service.DispatchServer(
        tf.data.experimental.service.DispatcherConfig(port=port)))


def start_worker(dispatcher: str, port: int, address: str) -> tf.data.experimental.service.WorkerServer:
    """A worker of `dispatcher` (HOST:PORT) on `port`, which trainers reach at `address`."""
    return _started("worker", port, lambda: tf.data.experimental.service.WorkerServer(
        tf.data.experimental.service.WorkerConfig(dispatcher_address=dispatcher, worker_address=address, port=port)))


def _started(role, port, start):
    if port:  # gRPC binds with SO_REUSEPORT: a second server on a taken port would share it silently
        with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as probe:
            try:
                probe.bind(("", port))
            except OSError as e:
                raise CapstfError(f"Cannot start the tf.data service {role} on port {port}: "
                                  f"{e.strerror or e}.") from None
    try:
        return start()
    except tf.errors.OpError as e:
        raise RuntimeFailure(f"Cannot start the tf.data service {role} on port {port}: {first_line(e)}") from None

"""pyzmq below its Python wrappers, for the paths every message takes.

Every request, reply and channel message of the edge and the worker crosses
these: the Cython methods under pyzmq's ``Socket`` wrappers, with plain-int flags
(pyzmq's flag enums cost an enum operation per use, and the wrappers more than
the calls themselves).
"""

import zmq

NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_RCVMORE = int(zmq.RCVMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)

send = zmq.backend.Socket.send  # send(sock, frame, flags)
recv = zmq.backend.Socket.recv  # recv(sock, flags)
_get = zmq.backend.Socket.get


def readable(sock) -> bool:
    """True when a message is waiting (cheaper than a recv that raises zmq.Again)."""
    return bool(_get(sock, _EVENTS) & _POLLIN)


def recv_frames(sock) -> list:
    """One whole message; raises zmq.Again when none is waiting."""
    frames = [recv(sock, NOBLOCK)]
    while _get(sock, _RCVMORE):
        frames.append(recv(sock, NOBLOCK))
    return frames


def send_frames(sock, frames) -> None:
    """One whole message of ``frames`` (a blocking send, as the socket's options allow)."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        send(sock, frame, _SNDMORE if i < last else 0)

import socket
import time

from protocol import session


def test_socket_unsent_counts_what_the_peer_has_not_yet_taken() -> None:
    """The uplink backlog deviced plans with is measured on its connection: bytes written but not acknowledged."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        sock.connect(server.getsockname())
        peer, _ = server.accept()
        with sock, peer:
            assert session.socket_unsent(sock) == 0
            sock.setblocking(False)
            sent = 0
            try:  # the peer reads nothing: its window fills, then our send buffer
                while True:
                    sent += sock.send(bytes(4096))
            except BlockingIOError:
                pass
            stuck = session.socket_unsent(sock)
            assert 0 < stuck <= sent
            peer.settimeout(5)
            received = 0
            while received < sent:  # the peer takes everything: nothing stays unacknowledged
                received += len(peer.recv(1 << 20))
            end = time.monotonic() + 5
            while session.socket_unsent(sock) and time.monotonic() < end:
                time.sleep(0.001)
            assert session.socket_unsent(sock) == 0
    assert session.socket_unsent(sock) == 0  # closed: nothing to tell
    assert session.socket_unsent(None) == 0

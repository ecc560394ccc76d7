"""The mailbox between a stage's compute thread and its transport thread."""

import threading
import time

from mesh.transport.sockets import Forward, Mailbox


def test_hand_over_returns_once_the_reader_has_sent_what_was_put():
    mailbox = Mailbox()
    mailbox.reader = True
    sent: list[object] = []
    drained = threading.Event()

    def reader() -> None:
        while not (items := mailbox.drain()):
            time.sleep(0.001)
        drained.set()
        sent.extend(items)
        time.sleep(0.05)  # sending takes a while: hand_over must wait for done, not drain
        mailbox.done(len(items))

    thread = threading.Thread(target=reader)
    try:
        thread.start()
        item = Forward([b"frame"], [(b"owner", 1)])
        mailbox.put(item)
        start = time.monotonic()
        mailbox.hand_over(5.0)
        assert drained.is_set() and sent == [item]
        assert 0.04 < time.monotonic() - start < 4.0
    finally:
        thread.join()
        mailbox.close()


def test_hand_over_is_bounded_and_waits_for_no_absent_reader():
    mailbox = Mailbox()
    try:
        mailbox.put(Forward([b"frame"], [(b"owner", 1)]))
        start = time.monotonic()
        mailbox.hand_over(5.0)  # no transport thread: nothing to wait for
        assert time.monotonic() - start < 1.0
        mailbox.reader = True  # a reader that never drains: the timeout ends the wait
        start = time.monotonic()
        mailbox.hand_over(0.05)
        assert 0.04 < time.monotonic() - start < 1.0
        assert len(mailbox.drain()) == 1
    finally:
        mailbox.close()

"""An HL7 v2 sender for tests: ORU^R01 DXA messages and a plain-socket MLLP client.

The client is deliberately not python-hl7 (the code under test uses it): raw bytes on a real TCP
socket, so malformed frames, oversized messages and half-sent frames can be sent as an interface
engine with a bug would send them.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

START, END = b"\x0b", b"\x1c\r"


def oru_message(patient_id: str | None, dxa_date: str, t_scores: Sequence[tuple[str, str, str]], *,
                issuer: str = "HOSP_A", control_id: str = "MSG00001", message_type: str = "ORU^R01^ORU_R01",
                sex: str = "F", birth_date: str = "19500101") -> str:
    """An ORU^R01 with one OBR (OBR-7 = ``dxa_date``) and one OBX per (LOINC code, name, value)."""
    pid3 = f"{patient_id}^^^{issuer}^MR" if patient_id is not None else ""
    segments = [
        f"MSH|^~\\&|DXA_SCANNER|RADIOLOGY|OSTEOGATE|RADIOLOGY|{dxa_date}120000||{message_type}|{control_id}|P|2.5",
        f"PID|1||{pid3}||TEST^PATIENT||{birth_date}|{sex}",
        f"OBR|1|ORD{control_id}|FIL{control_id}|77080^DXA BONE DENSITY AXIAL^CPT|||{dxa_date}093000",
    ]
    for number, (code, name, value) in enumerate(t_scores, start=1):
        segments.append(f"OBX|{number}|NM|{code}^{name}^LN||{value}|{{T-score}}|||||F")
    return "\r".join(segments) + "\r"


@dataclass
class Ack:
    code: str  # MSA-1
    control_id: str  # MSA-2
    text: str  # MSA-3

    @classmethod
    def parse(cls, raw: bytes) -> Ack:
        assert raw.startswith(START) and raw.endswith(END), raw[:80]
        segments = raw[1:-2].decode().strip("\r").split("\r")
        msa = next(s for s in segments if s.startswith("MSA|")).split("|")
        msa += [""] * (4 - len(msa))
        text = msa[3]
        for escaped, plain in (("\\F\\", "|"), ("\\S\\", "^"), ("\\R\\", "~"), ("\\T\\", "&"), ("\\E\\", "\\")):
            text = text.replace(escaped, plain)
        return cls(msa[1], msa[2], text)


class MllpClient:
    """One MLLP connection; ``send`` writes a frame and reads the ACK frame."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10,
                 tls: ssl.SSLContext | None = None) -> None:
        raw = socket.create_connection((host, port), timeout=timeout)
        self.sock = tls.wrap_socket(raw, server_hostname=host) if tls else raw
        self._buffer = b""

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, message: str | bytes) -> Ack:
        payload = message.encode() if isinstance(message, str) else message
        self.send_raw(START + payload + END)
        return self.read_ack()

    def read_ack(self) -> Ack:
        while END not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed by the listener before an ACK ({self._buffer[:80]!r})")
            self._buffer += chunk
        frame, _, self._buffer = self._buffer.partition(END)
        return Ack.parse(frame + END)

    def closed_by_peer(self) -> bool:
        """Whether the listener closed the connection (waits up to the socket timeout)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> MllpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

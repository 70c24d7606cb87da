"""paho's client, with a large PUBLISH read straight into the buffer its handler gets.

paho reads a packet's body in pieces of whatever the socket holds (each ``recv`` a fresh
bytes object the size of what is still missing), appends them to a bytearray, and then
copies the payload out of that bytearray three times (``struct.unpack`` of the topic
length, the topic, the packet id). For a 1 MiB artifact chunk that is five allocations
and four copies of a mebibyte before the agent sees a byte.

:class:`Client` reads the body of a PUBLISH of at least :data:`DIRECT_BYTES` with
``recv_into`` into one bytearray the size of the body, and hands its handler that same
bytearray with the topic and packet id cut from its front (CPython moves the start of a
bytearray without copying it). One allocation, one copy (the kernel's). Every other
packet, a QoS 2 PUBLISH included, goes through paho's own code; so does everything on a
transport without ``recv_into`` (websockets).

This reaches into paho's private packet state (``_in_packet``, ``_sock``); the tests run
every MQTT path of the agent through it, on the paho version installed.
"""

from __future__ import annotations

import ssl
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

__all__ = ["DIRECT_BYTES", "Client"]

DIRECT_BYTES = 64 * 1024  # PUBLISH bodies from this size on are read into their own buffer
_PUBLISH = 0x30


class Client(mqtt.Client):
    """A paho client whose large PUBLISH payloads are bytearrays read in place."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._direct: bytearray | None = None  # the body being read in place, if any

    def _packet_read(self) -> MQTTErrorCode:
        packet = self._in_packet
        if packet["command"] == 0 or not packet["have_remaining"]:
            rc = self._read_fixed_header()
            if rc is not None:
                return rc
        body = packet["packet"]
        if self._direct is None or body is not self._direct:
            return super()._packet_read()  # paho's own reading and handling
        view = memoryview(body)
        try:
            while packet["to_process"] > 0:
                start = packet["remaining_length"] - packet["to_process"]
                try:
                    got = self._sock.recv_into(view[start:])  # type: ignore[union-attr]
                except (BlockingIOError, ssl.SSLWantReadError):
                    return MQTTErrorCode.MQTT_ERR_AGAIN
                except ssl.SSLWantWriteError:
                    self._call_socket_register_write()
                    return MQTTErrorCode.MQTT_ERR_AGAIN
                except (OSError, AttributeError):
                    return MQTTErrorCode.MQTT_ERR_CONN_LOST
                if got == 0:
                    return MQTTErrorCode.MQTT_ERR_CONN_LOST
                packet["to_process"] -= got
                with self._msgtime_mutex:
                    self._last_bytes_received = time.monotonic()
        finally:
            view.release()
        # The body is in: paho handles the packet (see _handle_publish) and resets its state.
        return super()._packet_read()

    def _read_fixed_header(self) -> MQTTErrorCode | None:
        """The command byte and the remaining length, as paho reads them; then, for a large
        PUBLISH on a socket that has ``recv_into``, the buffer its body is read into.
        None when the header is complete."""
        packet = self._in_packet
        if packet["command"] == 0:
            rc, byte = self._recv_byte()
            if byte is None:
                return rc
            packet["command"] = byte
        while not packet["have_remaining"]:
            rc, byte = self._recv_byte()
            if byte is None:
                return rc
            packet["remaining_count"].append(byte)
            if len(packet["remaining_count"]) > 4:  # at most 4 bytes of length (MQTT 2.2.3)
                return MQTTErrorCode.MQTT_ERR_PROTOCOL
            packet["remaining_length"] += (byte & 127) * packet["remaining_mult"]
            packet["remaining_mult"] *= 128
            if byte & 128 == 0:
                packet["have_remaining"] = 1
                packet["to_process"] = packet["remaining_length"]
        if (packet["command"] & 0xF0) == _PUBLISH and (packet["command"] & 0x06) != 0x04 \
                and packet["remaining_length"] >= DIRECT_BYTES and self._protocol != mqtt.MQTTv5 \
                and hasattr(self._sock, "recv_into") and not packet["packet"]:
            self._direct = bytearray(packet["remaining_length"])
            packet["packet"] = self._direct
        return None

    def _recv_byte(self) -> tuple[MQTTErrorCode, int | None]:
        try:
            data = self._sock_recv(1)
        except BlockingIOError:
            return MQTTErrorCode.MQTT_ERR_AGAIN, None
        except OSError:
            return MQTTErrorCode.MQTT_ERR_CONN_LOST, None
        if not data:
            return MQTTErrorCode.MQTT_ERR_CONN_LOST, None
        return MQTTErrorCode.MQTT_ERR_SUCCESS, data[0]

    def _handle_publish(self) -> MQTTErrorCode:
        body = self._in_packet["packet"]
        if self._direct is None or body is not self._direct:
            return super()._handle_publish()
        self._direct = None
        command = self._in_packet["command"]
        qos = (command & 0x06) >> 1
        if len(body) < 2:
            return MQTTErrorCode.MQTT_ERR_PROTOCOL
        end = 2 + int.from_bytes(body[:2], "big")
        if end == 2 or end + (2 if qos else 0) > len(body):
            return MQTTErrorCode.MQTT_ERR_PROTOCOL  # no topic, or one longer than the packet
        topic = bytes(body[2:end])
        mid = 0
        if qos:
            mid = int.from_bytes(body[end:end + 2], "big")
            end += 2
        del body[:end]  # the payload: CPython advances the bytearray's start, no copy
        message = mqtt.MQTTMessage(mid=mid, topic=topic)
        message.qos = qos
        message.dup = bool(command & 0x08)
        message.retain = bool(command & 0x01)
        message.payload = body  # type: ignore[assignment]
        message.timestamp = time.monotonic()
        self._handle_on_message(message)
        if qos == 1 and not self._manual_ack:
            return self._send_puback(mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

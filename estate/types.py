"""Identifier types shared by every layer."""

from typing import NewType

DeviceId = NewType("DeviceId", str)
"""A board's string id, as in its topics (`H001`)."""

CentralId = NewType("CentralId", int)
"""The central backend's numeric id of a device (used in central MQTT commands)."""

DevicePk = NewType("DevicePk", int)
"""The local database's primary key of a device."""

__all__ = ["CentralId", "DeviceId", "DevicePk"]

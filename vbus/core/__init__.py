"""The core model: deviceclasses, devices, buses, members and connections.

Pure Python, no IO: process facts come from an injected ``TaskInfo``
(``vbus.procfs.ProcTasks`` in the daemon).  Everything administrative goes
through ``Topology``; connectors get ``Connection`` objects from it.
"""

from vbus.core.config import apply_config, check_config, default_config_text, load_config_text
from vbus.core.device import Attribute, DeviceModel, Session
from vbus.core.members import (
    NOT_A_MEMBER,
    Domain,
    DomidRule,
    Identity,
    MemberIndex,
    Peer,
    PidRule,
    Rule,
    TaskInfo,
    UidRule,
    Vm,
    identity_fields,
    parse_rule,
    process_of,
    rule_syntax,
)
from vbus.core.model import (
    BUS_GONE,
    DEVICE_REMOVED,
    Bus,
    Connection,
    Device,
    RevokeCallback,
    RevokeKind,
    Topology,
    validate_name,
)
from vbus.core.registry import ENTRY_POINT_GROUP, Registry

__all__ = [
    "BUS_GONE",
    "DEVICE_REMOVED",
    "ENTRY_POINT_GROUP",
    "NOT_A_MEMBER",
    "Attribute",
    "Bus",
    "Connection",
    "Device",
    "DeviceModel",
    "Domain",
    "DomidRule",
    "Identity",
    "MemberIndex",
    "Peer",
    "PidRule",
    "Registry",
    "RevokeCallback",
    "RevokeKind",
    "Rule",
    "Session",
    "TaskInfo",
    "Topology",
    "UidRule",
    "Vm",
    "apply_config",
    "check_config",
    "default_config_text",
    "identity_fields",
    "load_config_text",
    "parse_rule",
    "process_of",
    "rule_syntax",
    "validate_name",
]

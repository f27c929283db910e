"""The CPU proxy benchmark: a protocol of runs on Sounding Shapes and the runner that makes them."""

from avs.proxy.passes import followup_commands
from avs.proxy.protocol import CEILINGS_FILE, PROTOCOL_FILE, ProxyRun, expand, validate
from avs.proxy.runner import ProxyOutcome, finished, run_protocol

__all__ = [
    "CEILINGS_FILE",
    "PROTOCOL_FILE",
    "ProxyOutcome",
    "ProxyRun",
    "expand",
    "finished",
    "followup_commands",
    "run_protocol",
    "validate",
]

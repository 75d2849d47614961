"""The pure protocol core: TCP segments in, HTTP exchanges out. No clock, no I/O."""

from exporter.core.flows import CoreStats, Limits, Tracker
from exporter.core.http1 import KNOWN_METHODS, PARSE_ERROR_REASONS, method_label, normalise_target
from exporter.core.model import Exchange, Segment
from exporter.core.routes import RouteMapper

__all__ = [
    "KNOWN_METHODS",
    "PARSE_ERROR_REASONS",
    "CoreStats",
    "Exchange",
    "Limits",
    "RouteMapper",
    "Segment",
    "Tracker",
    "method_label",
    "normalise_target",
]

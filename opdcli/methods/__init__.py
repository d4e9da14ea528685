"""Method registry: importing this package registers every method."""

from opdcli.methods import fopd, gopd, opd, prefix, prune, release, topd  # noqa: F401  (registers)
from opdcli.methods.base import METHODS, Method, MethodOutput, build_method, method_class

__all__ = ["METHODS", "Method", "MethodOutput", "build_method", "method_class"]

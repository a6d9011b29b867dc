"""The engine: a Model (one opened checkpoint, shared) and Sessions (one generation each).

Everything outside this package uses these names; the stages and runtime services behind
them are the engine's business. `Engine` is a Model with one-call generate/logits.
"""
from flashmoe.engine.facade import Engine
from flashmoe.engine.model import Model
from flashmoe.engine.options import DTYPES, EngineOptions
from flashmoe.engine.session import Session, TokenEvent, Totals
from flashmoe.stages.observer import ReadObserver, ReadTrace

__all__ = ["DTYPES", "Engine", "EngineOptions", "Model", "ReadObserver", "ReadTrace", "Session",
           "TokenEvent", "Totals"]

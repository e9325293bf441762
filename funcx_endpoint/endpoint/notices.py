"""Warnings about ``config.py`` values accepted for funcX 1.0 compatibility.

A funcX 1.0 ``config.py`` loads unchanged, but a few of its settings have no
meaning in this design (:meth:`~funcx_endpoint.config.fields.ConfigObject.notices`).
The daemon's ``config`` part logs one warning for each one given, when the
daemon starts (so that it lands in ``endpoint.log``), naming the setting, its
value and what it means here.
"""

from __future__ import annotations

from typing import List, Sequence

from twisted.application.service import Service
from twisted.logger import Logger

from funcx_endpoint.config.fields import Notice


class ConfigNotices(Service):
    """Logs each :class:`Notice` once, as a warning, when started."""

    log = Logger()
    name = "config"

    def __init__(self, notices: Sequence[Notice]) -> None:
        self.notices: List[Notice] = list(notices)

    def startService(self) -> None:
        super().startService()
        for notice in self.notices:
            self.log.warn(
                "config.py: {notice} (accepted for funcX 1.0 compatibility)",
                notice=notice.text(),
                setting=notice.setting,
            )

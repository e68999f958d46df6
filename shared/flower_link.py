"""How a Flower client (a SuperNode, the `flwr` CLI) reaches a SuperLink: TLS with a CA, or plain HTTP only when
asked for by name. There is no silent default: plain HTTP lets anyone on the path read and change the stitch
weights in flight, so every caller says `insecure` explicitly (the single-machine demo does)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigError


@dataclass(frozen=True)
class LinkSecurity:
    root_certificates: str | None = None  # the CA file that signed the SuperLink's certificate
    insecure: bool = False

    def __post_init__(self):
        if bool(self.root_certificates) == self.insecure:
            raise ConfigError("a SuperLink is reached either over TLS (a CA file) or, when asked for, insecurely",
                              "give the CA of the SuperLink's certificate, or insecure on a single machine")

    @classmethod
    def choose(cls, root_certificates: str | None, insecure: bool, flags: str) -> "LinkSecurity":
        """From command-line flags; `flags` names them in the error when neither or both are given."""
        if bool(root_certificates) == bool(insecure):
            raise ConfigError(f"give exactly one of {flags}",
                              "TLS with the SuperLink's CA, or plain HTTP on a single machine only")
        return cls(str(Path(root_certificates).resolve()) if root_certificates else None, bool(insecure))

    def supernode_args(self) -> list[str]:
        return ["--insecure"] if self.insecure else ["--root-certificates", self.root_certificates]

    def flwr_connection(self) -> dict:
        """The security part of a connection in `$FLWR_HOME/config.toml`."""
        return {"insecure": True} if self.insecure else {"root-certificates": self.root_certificates}


INSECURE = LinkSecurity(insecure=True)

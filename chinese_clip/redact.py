"""Credentials that users write into data and evaluation URLs (`https://user:pass@host/...`, a presigned
URL's signature) kept out of everything a run writes or sends: config.yaml, model cards, tracker
hyperparameters, the checkpoint's data position, log lines. The run itself reads the URLs as given."""
from __future__ import annotations

import re

REDACTED = "***"
# A query parameter holds a credential when the last word of its name is one of these: X-Amz-Signature,
# X-Amz-Credential, X-Amz-Security-Token, X-Goog-Signature, Azure SAS's sig, access_token, api_key, ...
SECRET_WORDS = frozenset({"signature", "sig", "credential", "token", "key", "apikey", "secret", "password", "passwd",
                          "pwd", "awsaccesskeyid"})
_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^\s\"'`<>]+", re.IGNORECASE)
_USERINFO = re.compile(r"^([^:]+://)[^/?#]*@")  # all of it: a token may be the user name (https://<token>@host)
_PARAM = re.compile(r"([?&;#])([^=&;#]+)=([^&;#]*)")


def redact_url(text: str) -> str:
    """`text` with every URL's user info and credential query values replaced by ***: safe to write out."""
    return _URL.sub(lambda url: _PARAM.sub(_redact_param, _USERINFO.sub(rf"\g<1>{REDACTED}@", url.group())), text)


def _redact_param(param: re.Match) -> str:
    separator, name, _ = param.groups()
    secret = re.split(r"[-_]", name.lower())[-1] in SECRET_WORDS
    return f"{separator}{name}={REDACTED}" if secret else param.group()


def redact(value):
    """`value` (a config as plain dicts, lists and strings) with every string in it passed through redact_url."""
    if isinstance(value, dict):
        return {key: redact(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(item) for item in value]
    return redact_url(value) if isinstance(value, str) else value

"""What counts as a credential when `gammaray submit` stages a job: file names, file contents,
values of the submitting shell's variables, and URLs that carry a user name or password.

Everything here is a pure function of names, bytes and strings (no Ray, no I/O besides the
environment), so infra/jobs.py can check a plan before anything leaves the machine.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable

# names of variables whose values are credentials (matched case-insensitively anywhere in the name)
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|PASSPHRASE|CREDENTIAL|PRIVATE_KEY|ACCESS_KEY|API_KEY|"
                         r"SESSION_KEY", re.IGNORECASE)
REFERENCE_NAME = re.compile(r"(_PATH|_FILE|_DIR|_MODE)$", re.IGNORECASE)  # point at a credential, do not hold it
# an access key *ID* names a key pair and is not secret (AWS documents it as such); its value is
# often a plain word (the local S3 server's is "gammaray") that every project file contains
KEY_ID_NAME = re.compile(r"KEY_ID$", re.IGNORECASE)
# identifiers by convention (a commit, a run id, a version): a random-looking value under such a
# name is not taken for a secret (CI exports the commit sha, and jobs are often tagged with it)
IDENTIFIER_NAME = re.compile(r"(_SHA|_COMMIT|_REF|_REVISION|_ID|_VERSION|_PATH|_FILE|_DIR|_HOME)$", re.IGNORECASE)
MIN_SECRET_LEN = 8  # shorter values ("1", "true") would match everywhere and protect nothing
ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")

# --------------------------------------------------------------------------------------------
# files that must not be uploaded

# (pattern on one path component, what it is); a directory pattern covers everything below it
CREDENTIAL_NAMES: list[tuple[re.Pattern, str]] = [(re.compile(p), what) for p, what in [
    (r"id_(rsa|dsa|ecdsa|ed25519)(_sk)?([._-].*)?(?<!\.pub)", "an SSH private key"),
    (r"\.ssh", "an SSH folder (keys, known hosts)"),
    (r"[._]netrc", "a netrc file (login passwords)"),
    (r"\.pgpass", "a PostgreSQL password file"),
    (r"\.pypirc", "PyPI upload credentials"),
    (r"\.npmrc", "npm credentials"),
    (r"\.git-credentials", "a git credential store"),
    (r"\.docker", "a Docker folder (registry logins in config.json)"),
    (r"kubeconfig([._-].*)?|.*\.kubeconfig", "a kubeconfig (cluster credentials)"),
    (r"\.kube", "a Kubernetes folder (kubeconfig)"),
    (r"credentials", "a credentials file (AWS and others)"),
    (r"\.aws|\.azure|\.gcloud|application_default_credentials\.json", "a cloud CLI's credentials"),
    (r".*\.tfstate(\.backup)?", "Terraform state (holds secrets in clear text)"),
    (r"\.env(\.(?!(example|sample|template|dist)$).+)?|\.envrc", "a dotenv/direnv file"),
    (r".*\.(key|p12|pfx|jks|keystore|ppk)", "a private key or keystore"),
    (r"\.?htpasswd", "an htpasswd file"),
    (r"\.ray|auth_token|.*\.token", "a Ray cluster token"),
    (r"\.gnupg", "a GnuPG folder (private keys)"),
]]

# PEM and PuTTY private keys (an RSA/EC/OpenSSH/PKCS#8/encrypted/PGP key block), found in any file
PRIVATE_KEY_BLOCK = re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|PuTTY-User-Key-File-\d+:")
KUBECONFIG_KIND = re.compile(rb"(?m)^kind:\s*Config\s*$")
KUBECONFIG_USERS = re.compile(rb"(?m)^users:")
MAX_JSON_SCAN = 4 << 20  # service-account keys are a few KB; larger JSON is data


def credential_name(rel: str) -> str | None:
    """What credential a project path's name says it holds (None: nothing by name)."""
    for part in rel.split("/"):
        for pattern, what in CREDENTIAL_NAMES:
            if pattern.fullmatch(part):
                return what
    return None


# tokens and keys by their own shape, in a file of any name and format (INI, TOML, YAML, shell, ...).
# A value is a literal of the token's alphabet: `${NAME}` references and code (`self.secret_key`) are not
TOKEN_SHAPES: list[tuple[re.Pattern, str]] = [(re.compile(p), what) for p, what in [
    (rb"(?i)aws_?secret_?access_?key[\"']?\s*[=:]\s*[\"']?[A-Za-z0-9/+=]{30,}", "an AWS secret access key"),
    (rb"(?i)aws_?session_?token[\"']?\s*[=:]\s*[\"']?[A-Za-z0-9/+=]{30,}", "an AWS session token"),
    (rb"(?<![A-Za-z0-9_])gh[pousr]_[A-Za-z0-9]{36,}", "a GitHub token"),
    (rb"(?<![A-Za-z0-9_])github_pat_[A-Za-z0-9_]{40,}", "a GitHub fine-grained token"),
    (rb"(?<![A-Za-z0-9_])xox[abprs]-[A-Za-z0-9-]{10,}", "a Slack token"),
    (rb"(?<![A-Za-z0-9_])glpat-[A-Za-z0-9_-]{20,}", "a GitLab token"),
    (rb"(?<![A-Za-z0-9_])sk_live_[A-Za-z0-9]{20,}", "a Stripe secret key"),
]]
# a dotenv line NAME=value (in *.env files): a credential when NAME says so and value is a literal
DOTENV_LINE = re.compile(rb"(?m)^[ \t]*(?:export[ \t]+)?([A-Za-z_][A-Za-z0-9_]*)[ \t]*=[ \t]*[\"']?([^\s\"'#$][^\s\"'#]*)")
CHUNK = 1 << 20        # files are read and copied this much at a time, never whole
OVERLAP = 8 << 10      # kept from the previous chunk: a key or token cut by a chunk edge is still seen


class ContentCheck:
    """What credential a file's bytes hold, fed in chunks (`feed`, then `result`): private-key
    blocks, kubeconfigs, token shapes, dotenv secrets in *.env files, service-account JSON."""

    def __init__(self, rel: str):
        self.rel = rel
        self.found: str | None = None
        self._tail = b""
        self._kube_kind = self._kube_users = False
        self._head = bytearray()        # the first MAX_JSON_SCAN bytes, for a JSON key
        self._json_ok = True

    def feed(self, chunk: bytes) -> str | None:
        if self.found is None:
            window = self._tail + chunk
            self.found = self._match(window)
            self._tail = window[-OVERLAP:]
        if self._json_ok:
            if len(self._head) + len(chunk) > MAX_JSON_SCAN:
                self._json_ok, self._head = False, bytearray()
            else:
                self._head += chunk
        return self.found

    def _match(self, window: bytes) -> str | None:
        if PRIVATE_KEY_BLOCK.search(window):
            return "a private key (PEM/PuTTY block)"
        self._kube_kind = self._kube_kind or bool(KUBECONFIG_KIND.search(window))
        self._kube_users = self._kube_users or bool(KUBECONFIG_USERS.search(window))
        if self._kube_kind and self._kube_users:
            return "a kubeconfig (cluster credentials)"
        for pattern, what in TOKEN_SHAPES:
            if pattern.search(window):
                return what
        if self.rel.rsplit("/", 1)[-1].endswith(".env"):
            for m in DOTENV_LINE.finditer(window):
                name = m.group(1).decode()
                if SECRET_NAME.search(name) and not REFERENCE_NAME.search(name) and len(m.group(2)) >= MIN_SECRET_LEN:
                    return f"a dotenv file with a secret ({name})"
        return None

    def result(self) -> str | None:
        if self.found is None and self._json_ok and self._head.lstrip()[:1] == b"{":
            try:
                doc = json.loads(bytes(self._head))
            except (ValueError, RecursionError):
                return None
            if isinstance(doc, dict) and (doc.get("type") in ("service_account", "authorized_user")
                                          or "private_key" in doc or "refresh_token" in doc):
                self.found = "a cloud service-account or user credential (JSON key)"
        return self.found


def credential_content(rel: str, data: bytes) -> str | None:
    """What credential a file's bytes hold (None: none recognised)."""
    check = ContentCheck(rel)
    for i in range(0, max(len(data), 1), CHUNK):
        if check.feed(data[i:i + CHUNK]):
            break
    return check.result()


# --------------------------------------------------------------------------------------------
# secret values


HEX_RUN = re.compile(r"[0-9a-fA-F]{16,}")
TOKEN_RUN = re.compile(r"[A-Za-z0-9+/=]{16,}")  # base64 / base62 runs; '-', '_', '.', ':' separate words
UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _class_switches(run: str) -> float:
    kind = ["u" if c.isupper() else "l" if c.islower() else "d" for c in run]
    return sum(a != b for a, b in zip(kind, kind[1:])) / (len(run) - 1)


def looks_like_secret(value: str) -> bool:
    """A generated token, whatever the variable is called: a hex run of 16+ characters with letters
    and digits, a UUID, or a base64/base62 run of 16+ characters mixing upper case, lower case and
    digits that switches between them as random text does (about 0.6 of adjacent pairs; CamelCase
    words like "NightlyTraining2024" stay near 0.2). Paths, URLs and text with spaces are not."""
    if not value or len(value) > 4096 or value[0] in "/~" or "://" in value or any(c.isspace() for c in value):
        return False
    if UUID.search(value):
        return True
    for run in HEX_RUN.findall(value):
        if any(c.isdigit() for c in run) and any(c.isalpha() for c in run):
            return True
    for run in TOKEN_RUN.findall(value):
        if (any(c.isupper() for c in run) and any(c.islower() for c in run) and any(c.isdigit() for c in run)
                and _class_switches(run) >= 0.3):
            return True
    return False


# scheme://userinfo@ : userinfo without '/', '@' or spaces (a password with those must be %-encoded)
URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^\s/@'\"<>]+)@([^\s/'\"<>]*)")


def url_credentials(text: str) -> list[tuple[str, str]]:
    """[(redacted URL, the secret part)] for every URL in `text` that carries a password
    (user:password@) or, over http(s), a bare user name (a token passed as the user:
    https://TOKEN@host). `${NAME}` parts are references, expanded where the URL is used (pip
    expands them in requirement files from each node's environment): not credentials."""
    out = []
    for m in URL_USERINFO.finditer(text):
        scheme, userinfo, host = m.group(1).lower(), m.group(2), m.group(3)
        user, sep, password = userinfo.partition(":")
        if password and not ENV_REF.match(password):
            out.append((f"{scheme}://{user}:***@{host}", password))
        elif not password and scheme.split("+")[-1] in ("http", "https") and user and not ENV_REF.match(user):
            out.append((f"{scheme}://***@{host}", user))
    return out


def secret_values(names: Iterable[str] = (), extra: Iterable[str] = (),
                  not_secret: Iterable[str] = ()) -> dict[str, str]:
    """{label: value} of every credential this process can see:

    - the variables in `names` (the config's secret_key_env, the --secret-env names) and every
      variable whose name looks like a credential (*SECRET*, *TOKEN*, *PASSWORD*, ...);
    - the value of any other variable that looks like a generated secret (`looks_like_secret`),
      unless its name marks an identifier (*_SHA, *_ID, ...);
    - the password (or token user name) inside any variable that holds a URL;
    - `extra` literal values (the Ray token).

    Variables holding an access key ID (`*_KEY_ID`, the config's access_key_env and whatever
    `not_secret` names) are skipped: a key id is not a secret, and is often a plain word."""
    names, skip = set(names), set(not_secret)
    out: dict[str, str] = {}
    for name, value in os.environ.items():
        if name in skip or KEY_ID_NAME.search(name):
            continue
        named = name in names or (SECRET_NAME.search(name) and not REFERENCE_NAME.search(name))
        if named and len(value) >= MIN_SECRET_LEN:
            out[f"${name}"] = value
        elif not named and not IDENTIFIER_NAME.search(name) and looks_like_secret(value):
            out[f"${name} (a secret-looking value)"] = value
        for _, secret in url_credentials(value):
            if len(secret) >= MIN_SECRET_LEN:
                out[f"the credential in ${name}'s URL"] = secret
    for i, v in enumerate(extra):
        if v and len(v) >= MIN_SECRET_LEN:
            out[f"<secret #{i}>"] = v
    return out

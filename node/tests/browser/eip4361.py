"""A strict parser of EIP-4361 (Sign-In with Ethereum) messages, written from the EIP's ABNF
(https://eips.ethereum.org/EIPS/eip-4361) and independent of the node's Rust code (which uses
the `siwe` crate): the browser test checks with it that the message a wallet is asked to sign
is a well-formed sign-in for the page's own origin before the test key signs it.

Strict means: LF line ends only, every line in the ABNF's order, no line or space the ABNF
does not allow, an EIP-55 checksummed address, RFC 3339 times, URIs that are RFC 3986 URIs.

    message = parse(text)          # raises Eip4361Error naming what is wrong
    message.domain, message.address, message.nonce, message.resources, ...

`python3 eip4361.py` runs the self-test (`self_test()`), which the browser driver also runs at
start: a parser that accepted anything would make the test's check worthless.
"""

import datetime
import re
from dataclasses import dataclass, field
from typing import List, Optional

from eth_utils import keccak

PREAMBLE = " wants you to sign in with your Ethereum account:"

# RFC 3986 character classes.
_UNRESERVED = r"A-Za-z0-9\-._~"
_SUB_DELIMS = r"!$&'()*+,;="
_GEN_DELIMS = r":/?#\[\]@"
_PCT = r"%[0-9A-Fa-f]{2}"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*\Z")
# A URI: scheme ":" then only characters a URI may hold (reserved, unreserved, %XX).
_URI = re.compile(rf"([A-Za-z][A-Za-z0-9+\-.]*):(?:[{_UNRESERVED}{_SUB_DELIMS}{_GEN_DELIMS}]|{_PCT})*\Z")
# The statement: reserved / unreserved / " ", one line.
_STATEMENT = re.compile(rf"[{_UNRESERVED}{_SUB_DELIMS}{_GEN_DELIMS} ]*\Z")
# authority without userinfo: a reg-name or IPv4 (or a bracketed IPv6), then an optional port.
_HOST = re.compile(rf"(?:\[[0-9A-Fa-f:.]+\]|(?:[{_UNRESERVED}{_SUB_DELIMS}]|{_PCT})+)\Z")
_NONCE = re.compile(r"[A-Za-z0-9]{8,}\Z")
_CHAIN_ID = re.compile(r"[0-9]+\Z")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}\Z")
# RFC 3339 date-time (section 5.6), fractions and offsets included.
_DATE_TIME = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(\.\d+)?(Z|[+-]\d{2}:\d{2})\Z"
)
_PCHAR = re.compile(rf"(?:[{_UNRESERVED}{_SUB_DELIMS}:@]|{_PCT})*\Z")


class Eip4361Error(ValueError):
    """The text is not an EIP-4361 message; the message says where and why."""


@dataclass
class Message:
    """The fields of a parsed message (times as timezone-aware datetimes)."""

    scheme: Optional[str]
    domain: str
    address: str
    statement: Optional[str]
    uri: str
    version: str
    chain_id: int
    nonce: str
    issued_at: datetime.datetime
    expiration_time: Optional[datetime.datetime] = None
    not_before: Optional[datetime.datetime] = None
    request_id: Optional[str] = None
    resources: List[str] = field(default_factory=list)


def eip55(address: str) -> str:
    """The EIP-55 mixed-case checksum spelling of a 0x address."""
    digits = address[2:].lower()
    hashed = keccak(text=digits).hex()
    return "0x" + "".join(c.upper() if int(h, 16) >= 8 else c for c, h in zip(digits, hashed))


def _date_time(text: str, what: str) -> datetime.datetime:
    match = _DATE_TIME.match(text)
    if not match:
        raise Eip4361Error(f"{what} is not an RFC 3339 date-time: {text!r}")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    offset = match.group(8)
    try:
        if offset == "Z":
            zone = datetime.timezone.utc
        else:
            sign = 1 if offset[0] == "+" else -1
            hours, minutes = int(offset[1:3]), int(offset[4:6])
            if hours > 23 or minutes > 59:
                raise ValueError("offset out of range")
            zone = datetime.timezone(sign * datetime.timedelta(hours=hours, minutes=minutes))
        # RFC 3339 allows a leap second (60); datetime does not: it is refused here.
        fraction = match.group(7)
        micros = int((fraction[1:] + "000000")[:6]) if fraction else 0
        return datetime.datetime(year, month, day, hour, minute, second, micros, tzinfo=zone)
    except ValueError as error:
        raise Eip4361Error(f"{what} is not a valid time: {text!r} ({error})") from None


def _uri(text: str, what: str) -> str:
    if not _URI.match(text):
        raise Eip4361Error(f"{what} is not an RFC 3986 URI: {text!r}")
    return text


def _domain(text: str) -> str:
    if "@" in text:
        raise Eip4361Error(f"the domain must not hold userinfo: {text!r}")
    host, port = text, None
    if not text.endswith("]") and ":" in text:
        host, port = text.rsplit(":", 1)
    if not _HOST.match(host):
        raise Eip4361Error(f"the domain is not an RFC 3986 authority: {text!r}")
    if port is not None and not re.fullmatch(r"[0-9]{1,5}", port):
        raise Eip4361Error(f"the domain's port is not a port: {text!r}")
    return text


def parse(text: str) -> Message:
    """Parses an EIP-4361 message; raises Eip4361Error when it is not exactly one."""
    if not isinstance(text, str):
        raise Eip4361Error("the message is not text")
    if "\r" in text:
        raise Eip4361Error("the message has a carriage return: lines end with LF only")
    lines = text.split("\n")
    position = 0

    def take(what: str) -> str:
        nonlocal position
        if position >= len(lines):
            raise Eip4361Error(f"the message ends where {what} should be")
        line = lines[position]
        position += 1
        return line

    def field_line(name: str) -> str:
        line = take(f"the {name!r} line")
        prefix = f"{name}: "
        if not line.startswith(prefix):
            raise Eip4361Error(f"line {position} should be '{prefix}…', found {line!r}")
        return line[len(prefix):]

    first = take("the first line")
    if not first.endswith(PREAMBLE):
        raise Eip4361Error(f"the first line is not '<domain>{PREAMBLE}': {first!r}")
    authority = first[: -len(PREAMBLE)]
    scheme = None
    if "://" in authority:
        scheme, authority = authority.split("://", 1)
        if not _SCHEME.match(scheme):
            raise Eip4361Error(f"not a URI scheme: {scheme!r}")
    domain = _domain(authority)

    address = take("the address")
    if not _ADDRESS.match(address):
        raise Eip4361Error(f"line 2 is not a 0x address of 40 hex digits: {address!r}")
    if address != eip55(address):
        raise Eip4361Error(f"the address is not EIP-55 checksummed: {address!r} (should be {eip55(address)})")
    if take("an empty line") != "":
        raise Eip4361Error("line 3 must be empty")
    statement = None
    line = take("the statement or an empty line")
    if line != "":
        if not _STATEMENT.match(line):
            raise Eip4361Error(f"the statement has characters EIP-4361 does not allow: {line!r}")
        statement = line
        if take("an empty line after the statement") != "":
            raise Eip4361Error(f"line {position} must be empty (after the statement)")

    uri = _uri(field_line("URI"), "the URI")
    version = field_line("Version")
    if version != "1":
        raise Eip4361Error(f"the version must be 1: {version!r}")
    chain = field_line("Chain ID")
    if not _CHAIN_ID.match(chain):
        raise Eip4361Error(f"the chain id is not a number: {chain!r}")
    nonce = field_line("Nonce")
    if not _NONCE.match(nonce):
        raise Eip4361Error(f"the nonce must be 8 or more letters and digits: {nonce!r}")
    issued_at = _date_time(field_line("Issued At"), "Issued At")
    message = Message(scheme, domain, address, statement, uri, version, int(chain), nonce, issued_at)

    # The optional fields, in this order, each at most once; then the resources.
    optional = ["Expiration Time", "Not Before", "Request ID"]
    while position < len(lines):
        line = take("a field")
        if line == "Resources:":
            while position < len(lines):
                item = take("a resource")
                if not item.startswith("- "):
                    raise Eip4361Error(f"line {position} should be a resource '- <uri>': {item!r}")
                message.resources.append(_uri(item[2:], "a resource"))
            break
        name, _, value = line.partition(": ")
        if name not in optional:
            raise Eip4361Error(f"line {position} is not a field EIP-4361 allows here: {line!r}")
        optional = optional[optional.index(name) + 1:]
        if name == "Expiration Time":
            message.expiration_time = _date_time(value, name)
        elif name == "Not Before":
            message.not_before = _date_time(value, name)
        else:
            if not _PCHAR.match(value):
                raise Eip4361Error(f"the request id has characters EIP-4361 does not allow: {value!r}")
            message.request_id = value
    return message


# The example of the EIP itself (its resources section).
EXAMPLE = """service.invalid wants you to sign in with your Ethereum account:
0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2

I accept the ServiceOrg Terms of Service: https://service.invalid/tos

URI: https://service.invalid/login
Version: 1
Chain ID: 1
Nonce: 32891756
Issued At: 2021-09-30T16:25:24Z
Resources:
- ipfs://bafybeiemxf5abjwjbikoz4mc3a3dla6ual3jsgpdr4cjr3oz3evfyavhwq/
- https://example.com/my-web2-claim.json"""


def self_test() -> None:
    """Accepts the EIP's example and refuses each of a set of broken ones."""
    message = parse(EXAMPLE)
    assert message.domain == "service.invalid" and message.nonce == "32891756", message
    assert message.resources[1] == "https://example.com/my-web2-claim.json", message
    assert message.statement.startswith("I accept"), message
    full = parse(EXAMPLE.replace("Issued At: 2021-09-30T16:25:24Z", "Issued At: 2021-09-30T16:25:24Z\nExpiration Time: 2021-10-30T16:25:24.5+02:00\nRequest ID: abc"))
    assert full.expiration_time.utcoffset() == datetime.timedelta(hours=2) and full.request_id == "abc", full
    # Without a statement, the ABNF leaves two empty lines between the address and the URI.
    no_statement = parse(EXAMPLE.replace("I accept the ServiceOrg Terms of Service: https://service.invalid/tos\n", ""))
    assert no_statement.statement is None, no_statement
    assert parse("https://" + EXAMPLE.replace("service.invalid wants", "localhost:5421 wants")).domain == "localhost:5421"
    broken = {
        "CRLF": EXAMPLE.replace("\n", "\r\n"),
        "a trailing newline": EXAMPLE + "\n",
        "a lower-case address": EXAMPLE.replace("0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2", "0xc02aaa39b223fe8d0a0e5c4f27ead9083c756cc2"),
        "a bad checksum": EXAMPLE.replace("0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2", "0xC02AAA39b223FE8D0A0e5C4F27eAD9083C756Cc2"),
        "a short nonce": EXAMPLE.replace("Nonce: 32891756", "Nonce: 3289175"),
        "version 2": EXAMPLE.replace("Version: 1", "Version: 2"),
        "no chain id": EXAMPLE.replace("Chain ID: 1\n", ""),
        "fields out of order": EXAMPLE.replace("Version: 1\nChain ID: 1", "Chain ID: 1\nVersion: 1"),
        "a bad time": EXAMPLE.replace("2021-09-30T16:25:24Z", "2021-09-30 16:25:24"),
        "a day that does not exist": EXAMPLE.replace("2021-09-30T16:25:24Z", "2021-02-30T16:25:24Z"),
        "an unknown field": EXAMPLE.replace("Resources:", "Color: blue\nResources:"),
        "a field twice": EXAMPLE.replace("Issued At: 2021-09-30T16:25:24Z", "Issued At: 2021-09-30T16:25:24Z\nNot Before: 2021-09-30T16:25:24Z\nNot Before: 2021-09-30T16:25:24Z"),
        "a statement of two lines": EXAMPLE.replace("Terms of Service:", "Terms\nof Service:"),
        "a statement with a non-ASCII character": EXAMPLE.replace("I accept", "I accept…"),
        "a space in the URI": EXAMPLE.replace("https://service.invalid/login", "https://service.invalid/log in"),
        "a resource without a dash": EXAMPLE.replace("- https://example.com", "https://example.com"),
        "userinfo in the domain": EXAMPLE.replace("service.invalid wants", "me@service.invalid wants"),
        "no empty line after the address": EXAMPLE.replace("Cc2\n\n", "Cc2\n"),
        "one empty line where there is no statement": EXAMPLE.replace("I accept the ServiceOrg Terms of Service: https://service.invalid/tos\n\n", ""),
    }
    for what, text in broken.items():
        try:
            parse(text)
        except Eip4361Error:
            continue
        raise AssertionError(f"the EIP-4361 parser accepted a message with {what}")


if __name__ == "__main__":
    self_test()
    print("eip4361: self-test passed")

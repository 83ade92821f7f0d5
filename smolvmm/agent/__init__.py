"""The host side of the guest agent: its untrusted channel, protocol, and the exec and file calls over it."""

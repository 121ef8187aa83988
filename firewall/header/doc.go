// Package header reads and writes the Ethernet, ARP, IPv4, ICMPv4, TCP and
// UDP headers the firewall handles, in place on byte slices.
//
// Each header is a named byte slice (IPv4, TCP, ...) with big-endian
// accessors at fixed offsets. Accessors do no bounds checking of their own:
// callers first establish that the slice is long enough, with the header's
// IsValid method or by decoding a whole frame with Parsed.Decode, which
// checks every length and offset and never allocates. Invalid input is
// never an error here, only a Kind that says what the frame is not.
package header

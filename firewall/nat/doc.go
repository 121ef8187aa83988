// Package nat is the firewall's masquerading table: it maps TCP, UDP and
// ICMP query flows from client VMs to ports (identifiers) on the uplink
// address and back, translates ICMP errors through the flow they quote,
// and bounds its memory with timeouts by state and LRU eviction.
//
// The table owns no clock and no lock: the caller passes monotonic time
// in nanoseconds and serializes calls. Lookups and translation of an
// existing flow never allocate; packets are rewritten in place with
// incremental checksum updates (package header). Matching packets against
// the rules, TTL handling and sending are the dispatcher's.
package nat

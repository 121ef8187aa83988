// Command qgfw builds, verifies, signs and installs the qubes-go-firewall image.
package main

func main() {}

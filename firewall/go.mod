module github.com/qubes-go-firewall/qubes-go-firewall/firewall

go 1.26.0

require golang.org/x/sys v0.50.0

require golang.org/x/net v0.62.0

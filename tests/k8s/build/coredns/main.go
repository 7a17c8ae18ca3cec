// CoreDNS with only the plugins the local cluster's DNS needs (the full build
// links every cloud provider's SDK). The directive order is CoreDNS's own
// (plugin.cfg): a plugin listed earlier sees a query first.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func init() {
	dnsserver.Directives = []string{
		"errors",
		"log",
		"health",
		"ready",
		"cache",
		"loadbalance",
		"kubernetes",
		"forward",
	}
}

func main() { coremain.Run() }

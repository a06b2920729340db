package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/esker-io/esker"
)

// httpTLSFlags are the flags of TLS on the node's HTTP API and between
// nodes.
type httpTLSFlags struct {
	cert, key, ca *string
}

func addHTTPTLSFlags(fs *flagSet) *httpTLSFlags {
	return &httpTLSFlags{
		cert: fs.String("tls-cert", "", "PEM `file` of this node's certificate (and chain): serve the HTTP API over HTTPS, with --tls-key; read again when it changes, for rotation"),
		key:  fs.String("tls-key", "", "PEM `file` of the private key of --tls-cert"),
		ca:   fs.String("tls-ca", "", "PEM `file` of the authority that signs the nodes' certificates: the node verifies the other nodes against it, presents its own certificate to them, and refuses forwarded requests without a certificate of it (mutual TLS; the certificates must allow server and client authentication)"),
	}
}

// enabled reports whether the node serves HTTPS.
func (f *httpTLSFlags) enabled() bool { return *f.cert != "" || *f.key != "" }

// options returns the node options of the flags, or a message for the user.
func (f *httpTLSFlags) options() ([]esker.Option, string) {
	switch {
	case *f.cert == "" && *f.key == "" && *f.ca == "":
		return nil, ""
	case *f.cert == "" || *f.key == "":
		return nil, "--tls-cert and --tls-key go together: the node's certificate and its private key"
	}
	pair, err := newKeyPair(*f.cert, *f.key)
	if err != nil {
		return nil, err.Error()
	}
	server := &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: pair.serverCertificate}
	peer := &tls.Config{MinVersion: tls.VersionTLS12, GetClientCertificate: pair.clientCertificate}
	if *f.ca != "" {
		pool, msg := readCAFile("--tls-ca", *f.ca)
		if msg != "" {
			return nil, msg
		}
		if msg := checkNodeCertificate(pair.cert, pool); msg != "" {
			return nil, msg
		}
		server.ClientCAs, server.ClientAuth = pool, tls.VerifyClientCertIfGiven
		peer.RootCAs = pool
	}
	return []esker.Option{esker.HTTPTLS(server), esker.PeerTLS(peer)}, ""
}

// checkNodeCertificate returns a message unless cert verifies against the
// nodes' authority for both uses mutual TLS puts it to: the others verify it
// as a server and as a client. Caught here, the mistake is a message at
// start instead of every forward failing its handshake.
func checkNodeCertificate(cert *tls.Certificate, pool *x509.CertPool) string {
	leaf := cert.Leaf
	if leaf == nil {
		var err error
		if leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return fmt.Sprintf("--tls-cert: %v", err)
		}
	}
	inter := x509.NewCertPool()
	for _, der := range cert.Certificate[1:] {
		if c, err := x509.ParseCertificate(der); err == nil {
			inter.AddCert(c)
		}
	}
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
			return fmt.Sprintf("--tls-cert does not verify against --tls-ca for %s: %v; with mutual TLS every node's certificate must be signed by that authority and allow serverAuth and clientAuth", usageName(usage), err)
		}
	}
	return ""
}

func usageName(u x509.ExtKeyUsage) string {
	if u == x509.ExtKeyUsageClientAuth {
		return "client authentication"
	}
	return "server authentication"
}

// readCAFile reads a PEM file of certificate authorities given by flag; it
// returns a message for the user when it cannot.
func readCAFile(flag, file string) (*x509.CertPool, string) {
	pem, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Sprintf("%s: %v", flag, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Sprintf("%s %s: no PEM certificate in the file", flag, file)
	}
	return pool, ""
}

// keyPair is a certificate and key read from files, read again when either
// file's modification time changes (checked at most once a second), so that
// a rotated certificate is served without a restart. A pair that fails to
// load (say, the certificate written but not yet its key) leaves the
// previous one in use.
type keyPair struct {
	certFile, keyFile string

	mu              sync.Mutex
	cert            *tls.Certificate
	certMod, keyMod time.Time
	checked         time.Time
}

func newKeyPair(certFile, keyFile string) (*keyPair, error) {
	p := &keyPair{certFile: certFile, keyFile: keyFile}
	if err := p.load(); err != nil {
		return nil, err
	}
	p.checked = time.Now()
	return p, nil
}

// load reads both files; p.mu is held or p is not shared yet.
func (p *keyPair) load() error {
	certInfo, err := os.Stat(p.certFile)
	if err != nil {
		return fmt.Errorf("--tls-cert: %v", err)
	}
	keyInfo, err := os.Stat(p.keyFile)
	if err != nil {
		return fmt.Errorf("--tls-key: %v", err)
	}
	cert, err := tls.LoadX509KeyPair(p.certFile, p.keyFile)
	if err != nil {
		return fmt.Errorf("--tls-cert %s, --tls-key %s: %v", p.certFile, p.keyFile, err)
	}
	p.cert, p.certMod, p.keyMod = &cert, certInfo.ModTime(), keyInfo.ModTime()
	return nil
}

// current returns the pair, read again first if a file changed.
func (p *keyPair) current() *tls.Certificate {
	p.mu.Lock()
	defer p.mu.Unlock()
	if now := time.Now(); now.Sub(p.checked) >= time.Second {
		p.checked = now
		c, errC := os.Stat(p.certFile)
		k, errK := os.Stat(p.keyFile)
		if errC == nil && errK == nil && (!c.ModTime().Equal(p.certMod) || !k.ModTime().Equal(p.keyMod)) {
			_ = p.load() // on failure the previous pair stays
		}
	}
	return p.cert
}

func (p *keyPair) serverCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return p.current(), nil
}

func (p *keyPair) clientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	return p.current(), nil
}

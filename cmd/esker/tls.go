package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
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

// options returns the node options of the flags, or a message for the
// user. host is the name or address the other nodes reach this node at: the
// certificate must be valid for it. log receives the certificate's reloads.
func (f *httpTLSFlags) options(host string, log *slog.Logger) ([]esker.Option, string) {
	switch {
	case *f.cert == "" && *f.key == "" && *f.ca == "":
		return nil, ""
	case *f.cert == "" && *f.key == "":
		return nil, "--tls-ca needs --tls-cert and --tls-key: mutual TLS between nodes needs each node's certificate"
	case *f.cert == "" || *f.key == "":
		return nil, "--tls-cert and --tls-key go together: the node's certificate and its private key"
	}
	var pool *x509.CertPool
	if *f.ca != "" {
		var msg string
		if pool, msg = readCAFile("--tls-ca", *f.ca); msg != "" {
			return nil, msg
		}
	}
	pair, err := newKeyPair(*f.cert, *f.key, pool, log)
	if err != nil {
		return nil, err.Error()
	}
	if host != "" {
		if err := pair.cert.Leaf.VerifyHostname(host); err != nil {
			return nil, fmt.Sprintf("--tls-cert is not valid for %s, where the other nodes reach this node (--advertise, else --http): %v", host, err)
		}
	}
	server := &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: pair.serverCertificate}
	peer := &tls.Config{MinVersion: tls.VersionTLS12, GetClientCertificate: pair.clientCertificate}
	if pool != nil {
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
// file changes (modification time or size, checked at most once a second),
// so that a rotated certificate is served without a restart. A pair that
// fails to load or to verify against the nodes' authority (say, the
// certificate written but not yet its key) leaves the previous one in use,
// and is logged.
type keyPair struct {
	certFile, keyFile string
	roots             *x509.CertPool // nil: no authority to check against
	log               *slog.Logger

	mu          sync.Mutex
	cert        *tls.Certificate
	stamp       string // the files' modification times and sizes when read
	checked     time.Time
	failedStamp string // the stamp whose load failed, logged once
}

func newKeyPair(certFile, keyFile string, roots *x509.CertPool, log *slog.Logger) (*keyPair, error) {
	p := &keyPair{certFile: certFile, keyFile: keyFile, roots: roots, log: log, checked: time.Now()}
	stamp, err := p.fileStamp()
	if err != nil {
		return nil, err
	}
	if err := p.load(stamp); err != nil {
		return nil, err
	}
	return p, nil
}

// fileStamp identifies the files' current versions.
func (p *keyPair) fileStamp() (string, error) {
	c, err := os.Stat(p.certFile)
	if err != nil {
		return "", fmt.Errorf("--tls-cert: %v", err)
	}
	k, err := os.Stat(p.keyFile)
	if err != nil {
		return "", fmt.Errorf("--tls-key: %v", err)
	}
	return fmt.Sprint(c.ModTime().UnixNano(), c.Size(), k.ModTime().UnixNano(), k.Size()), nil
}

// load reads and checks both files; p.mu is held or p is not shared yet.
func (p *keyPair) load(stamp string) error {
	cert, err := tls.LoadX509KeyPair(p.certFile, p.keyFile)
	if err != nil {
		return fmt.Errorf("--tls-cert %s, --tls-key %s: %v", p.certFile, p.keyFile, err)
	}
	if p.roots != nil {
		if msg := checkNodeCertificate(&cert, p.roots); msg != "" {
			return errors.New(msg)
		}
	}
	p.cert, p.stamp = &cert, stamp
	return nil
}

// current returns the pair, read again first if a file changed.
func (p *keyPair) current() *tls.Certificate {
	p.mu.Lock()
	defer p.mu.Unlock()
	if now := time.Now(); now.Sub(p.checked) >= time.Second {
		p.checked = now
		if stamp, err := p.fileStamp(); err == nil && stamp != p.stamp && stamp != p.failedStamp {
			if err := p.load(stamp); err != nil {
				p.failedStamp = stamp
				p.log.Warn("the rotated TLS certificate was not loaded; serving the previous one until the files change again", "err", err)
			} else {
				p.log.Info("TLS certificate reloaded", "file", p.certFile, "subject", p.cert.Leaf.Subject.String(), "expires", p.cert.Leaf.NotAfter)
			}
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

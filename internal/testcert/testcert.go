// Package testcert makes TLS certificates for tests, without files: the
// self-signed certificate tests give an in-process broker, and an authority
// that issues the certificates of nodes talking mutual TLS.
package testcert

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"testing"
	"time"
)

// Localhost returns a server TLS config for 127.0.0.1 with a fresh
// self-signed certificate, that certificate in PEM, and a pool holding it.
func Localhost(t testing.TB) (server *tls.Config, certPEM []byte, pool *x509.CertPool) {
	t.Helper()
	tmpl := template("esker test broker", true)
	tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	cert, key := sign(t, tmpl, nil, nil)
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	server = &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert}}}
	return server, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}), pool
}

// Authority is a certificate authority for tests that issues certificates
// for 127.0.0.1 valid for both server and client authentication, as
// mutual TLS between nodes needs.
type Authority struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	// PEM is the authority's certificate in PEM.
	PEM []byte
	// Pool holds the authority's certificate.
	Pool *x509.CertPool
}

// NewAuthority makes a fresh authority named name.
func NewAuthority(t testing.TB, name string) *Authority {
	t.Helper()
	cert, key := sign(t, template(name, true), nil, nil)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &Authority{cert: cert, key: key, PEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}), Pool: pool}
}

// Issue returns a certificate for 127.0.0.1 named name, signed by a, and
// the same certificate and its private key in PEM.
func (a *Authority) Issue(t testing.TB, name string) (cert tls.Certificate, certPEM, keyPEM []byte) {
	t.Helper()
	tmpl := template(name, false)
	tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	leaf, key := sign(t, tmpl, a.cert, a.key)
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leaf.Raw})
	keyPEM = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	cert, err = tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return cert, certPEM, keyPEM
}

// template is a certificate named name valid for an hour either side of
// now, with a random serial; ca makes it an authority.
func template(name string, ca bool) *x509.Certificate {
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62)) // never fails (crypto/rand panics instead)
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
	}
	if ca {
		tmpl.KeyUsage |= x509.KeyUsageCertSign
		tmpl.BasicConstraintsValid, tmpl.IsCA = true, true
	}
	return tmpl
}

// sign makes a fresh key and a certificate of tmpl for it, signed by parent
// with parentKey, or self-signed when parent is nil.
func sign(t testing.TB, tmpl, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key
}

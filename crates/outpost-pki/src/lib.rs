//! outpost's built-in certificate authority and TLS configuration.
//!
//! Owns: creating the hub's CA and server certificate, sealing the CA key under a secret
//! ([`sealed`]), signing node certificates from CSRs,
//! generating node keys and CSRs, CA fingerprints (the pin carried by join tokens), and building
//! rustls server/client configurations with the `ring` provider.
//!
//! Must never: do network or file I/O (callers persist the PEM strings), or trust anything in a
//! CSR beyond its public key (the hub decides the node's name and validity).
//!
//! Expired client certificates: the hub's TLS verifier ([`server_config`]) accepts a client
//! certificate that chains to the hub's CA but is past its `notAfter`, as it would have been
//! accepted just before then; the TLS handshake still proves the client holds the key. The hub
//! reads the expiry itself ([`not_after_der`]) and lets such a certificate call only the renew
//! route, so a node that was offline past its certificate's life can come back by itself.

pub mod sealed;

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName as TlsName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};

/// How long node certificates are valid by default (`outpost hub --node-cert-lifetime`).
/// Agents renew when a third of the validity is left.
pub const NODE_CERT_DAYS: i64 = 90;

/// [`NODE_CERT_DAYS`] as a duration.
pub const NODE_CERT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(NODE_CERT_DAYS as u64 * 86_400);
/// How long the CA is valid.
pub const CA_DAYS: i64 = 3650;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error("invalid PEM data for {what}")]
    Pem { what: &'static str },
    #[error("client verifier: {0}")]
    Verifier(String),
}

/// The crypto provider used everywhere in outpost.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Install `ring` as the process-wide default provider (idempotent).
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// SHA-256 of a certificate's DER encoding, lower-case hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Parse the first certificate from PEM text into DER.
pub fn pem_to_der(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    let first = certs_from_pem(pem)
        .into_iter()
        .next()
        .ok_or(PkiError::Pem { what: "certificate" })?;
    Ok(CertificateDer::from(first))
}

/// Every certificate in PEM text, as DER.
fn certs_from_pem(pem: &str) -> Vec<Vec<u8>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .map(|c| c.to_vec())
        .collect()
}

fn key_der(key_pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    let key = KeyPair::from_pem(key_pem)?;
    Ok(PrivateKeyDer::Pkcs8(key.serialize_der().into()))
}

/// How far back certificates are dated: a box whose clock runs behind (no RTC battery, no NTP
/// yet) must still accept the hub's certificate, and the hub a node's.
pub const BACKDATE_HOURS: i64 = 48;

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(BACKDATE_HOURS);
    params.not_after = now + time::Duration::days(days);
}

/// A CA as stored by the hub: certificate and private key, both PEM.
#[derive(Clone, Debug)]
pub struct CaMaterial {
    pub cert_pem: String,
    pub key_pem: String,
}

impl CaMaterial {
    /// Create a new self-signed CA.
    pub fn generate(name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("outpost CA {name}"));
        dn.push(DnType::OrganizationName, "outpost");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, CA_DAYS);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    pub fn cert_der(&self) -> Result<CertificateDer<'static>, PkiError> {
        pem_to_der(&self.cert_pem)
    }

    /// The pin that join tokens carry.
    pub fn fingerprint(&self) -> Result<String, PkiError> {
        Ok(fingerprint(&self.cert_der()?))
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, PkiError> {
        let key = KeyPair::from_pem(&self.key_pem)?;
        Ok(Issuer::from_ca_cert_pem(&self.cert_pem, key)?)
    }

    /// Issue the hub's TLS server certificate for the given DNS names / IP addresses.
    /// Returns (cert chain PEM, key PEM).
    pub fn issue_server(&self, names: &[String]) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "outpost hub");
        params.distinguished_name = dn;
        params.subject_alt_names = names.iter().map(|n| san(n)).collect::<Result<_, _>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut params, 825);
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok((format!("{}{}", cert.pem(), self.cert_pem), key.serialize_pem()))
    }

    /// Sign a node's CSR, valid for `lifetime` from now and from a little before (5 minutes,
    /// or a quarter of a shorter lifetime, for clock skew; agents renew with a third of the
    /// whole validity left). Only the CSR's public key is used: the subject and SAN are the
    /// node's name as decided by the hub. Returns the certificate PEM.
    pub fn sign_node_csr(&self, csr_pem: &str, node: &str, lifetime: std::time::Duration) -> Result<String, PkiError> {
        let now = time::OffsetDateTime::now_utc();
        let skew = time::Duration::seconds((lifetime.as_secs() / 4).min(300) as i64);
        let lifetime = time::Duration::try_from(lifetime).unwrap_or(time::Duration::days(NODE_CERT_DAYS));
        self.sign_node_csr_between(csr_pem, node, now - skew, now + lifetime)
    }

    fn sign_node_csr_between(
        &self,
        csr_pem: &str,
        node: &str,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Result<String, PkiError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node);
        dn.push(DnType::OrganizationName, "outpost:nodes");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(format!("outpost://node/{node}").try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = not_before;
        params.not_after = not_after;
        csr.params = params;
        Ok(csr.signed_by(&self.issuer()?)?.pem())
    }
}

fn san(name: &str) -> Result<SanType, PkiError> {
    Ok(match name.parse::<std::net::IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(name.to_string().try_into()?),
    })
}

/// A node's freshly generated key and the CSR to send with its join request.
pub struct NodeKey {
    pub key_pem: String,
    pub csr_pem: String,
}

impl NodeKey {
    pub fn generate(node: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node);
        params.distinguished_name = dn;
        let csr = params.serialize_request(&key)?;
        Ok(Self {
            key_pem: key.serialize_pem(),
            csr_pem: csr.pem()?,
        })
    }

    /// A new CSR for an existing key (certificate renewal keeps the key; rotation makes a new one).
    pub fn csr_for(key_pem: &str, node: &str) -> Result<String, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node);
        params.distinguished_name = dn;
        Ok(params.serialize_request(&key)?.pem()?)
    }
}

/// Seconds since the Unix epoch at which a PEM certificate expires.
pub fn not_after_unix(cert_pem: &str) -> Result<i64, PkiError> {
    Ok(validity_unix(cert_pem)?.1)
}

/// A PEM certificate's (notBefore, notAfter), in seconds since the Unix epoch.
pub fn validity_unix(cert_pem: &str) -> Result<(i64, i64), PkiError> {
    validity_der(&pem_to_der(cert_pem)?)
}

/// A DER certificate's (notBefore, notAfter), in seconds since the Unix epoch.
pub fn validity_der(der: &[u8]) -> Result<(i64, i64), PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| PkiError::Pem {
        what: "certificate validity",
    })?;
    Ok((
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    ))
}

/// Seconds since the Unix epoch at which a DER certificate expires.
pub fn not_after_der(der: &[u8]) -> Result<i64, PkiError> {
    Ok(validity_der(der)?.1)
}

/// The WebPKI client verifier, except that a certificate past its `notAfter` is verified as of
/// its `notAfter` (chain, signatures, key usage: everything else as usual). See the module docs.
#[derive(Debug)]
struct ExpiredClientCertsToo {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for ExpiredClientCertsToo {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[TlsName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.inner.verify_client_cert(end_entity, intermediates, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            )) => {
                let not_after = not_after_der(end_entity)
                    .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
                let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(not_after.max(0) as u64));
                self.inner.verify_client_cert(end_entity, intermediates, at)
            }
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The hub's client-certificate verifier: optional certificates that must chain to the hub's CA;
/// expired ones pass as described in the module docs.
fn client_verifier(ca: &CaMaterial) -> Result<Arc<dyn ClientCertVerifier>, PkiError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert_der()?)?;
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| PkiError::Verifier(e.to_string()))?;
    Ok(Arc::new(ExpiredClientCertsToo { inner }))
}

/// Server config for the hub: client certificates are optional at the TLS layer (join and admin
/// calls have none) and, when presented, must chain to the hub's CA (expired ones included, see
/// the module docs). Authorization happens per route.
pub fn server_config(ca: &CaMaterial, chain_pem: &str, key_pem: &str) -> Result<ServerConfig, PkiError> {
    let verifier = client_verifier(ca)?;
    let chain: Vec<CertificateDer<'static>> = certs_from_pem(chain_pem)
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key_der(key_pem)?)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Client config that trusts only the given CA, optionally presenting a client certificate.
pub fn client_config(ca_pem: &str, identity: Option<(&str, &str)>) -> Result<ClientConfig, PkiError> {
    let mut roots = RootCertStore::empty();
    roots.add(pem_to_der(ca_pem)?)?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut cfg = match identity {
        Some((cert_pem, key_pem)) => {
            let chain = vec![pem_to_der(cert_pem)?];
            builder.with_client_auth_cert(chain, key_der(key_pem)?)?
        }
        None => builder.with_no_client_auth(),
    };
    // HTTP/2 lets an agent's long-poll and status reports share one connection.
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Client config used once, at join time, to fetch the hub's CA before trusting it: it accepts
/// any server certificate, and the caller MUST compare the fetched CA's fingerprint with the
/// token's pin and then verify the hub's certificate chain against that CA.
pub fn bootstrap_client_config() -> Result<ClientConfig, PkiError> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer))
        .with_no_client_auth();
    Ok(cfg)
}

#[derive(Debug)]
struct AcceptAnyServer;

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------------
// The site peer link (docs/site-ha.md): boxes of one site talk to each other with their node
// certificates. Node certificates are client certificates (EKU clientAuth, a URI SAN
// `outpost://node/<name>`, no DNS name), so the side that accepts presents one too and the side
// that dials verifies it as a node certificate of this CA issued to the peer it meant to reach.

/// The node a certificate was issued to, from its `outpost://node/<name>` URI.
pub fn node_of_der(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|g| match g {
        x509_parser::extensions::GeneralName::URI(u) => u.strip_prefix("outpost://node/").map(String::from),
        _ => None,
    })
}

/// The accepting side of the peer link: client certificates are mandatory and must be node
/// certificates of this CA (not expired). The caller reads the peer's node from its certificate
/// ([`node_of_der`]).
pub fn peer_server_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<ServerConfig, PkiError> {
    let mut roots = RootCertStore::empty();
    roots.add(pem_to_der(ca_pem)?)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| PkiError::Verifier(e.to_string()))?;
    Ok(ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![pem_to_der(cert_pem)?], key_der(key_pem)?)?)
}

/// The dialling side of the peer link: presents this node's certificate and accepts only a node
/// certificate of this CA issued to the node named as the TLS server name.
pub fn peer_client_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<ClientConfig, PkiError> {
    let mut roots = RootCertStore::empty();
    roots.add(pem_to_der(ca_pem)?)?;
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| PkiError::Verifier(e.to_string()))?;
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PeerNodeVerifier { inner }))
        .with_client_auth_cert(vec![pem_to_der(cert_pem)?], key_der(key_pem)?)?)
}

/// Verifies a peer's node certificate: chain, validity and key usage as a node (client)
/// certificate of the CA, and the node name in it equal to the server name dialled.
#[derive(Debug)]
struct PeerNodeVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ServerCertVerifier for PeerNodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let want = match server_name {
            ServerName::DnsName(d) => d.as_ref().to_string(),
            _ => return Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName)),
        };
        match node_of_der(end_entity) {
            Some(n) if n == want => Ok(ServerCertVerified::assertion()),
            _ => Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName)),
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_cert_chains_to_ca_and_carries_hub_chosen_name() {
        let ca = CaMaterial::generate("test").unwrap();
        let nk = NodeKey::generate("evil-name").unwrap();
        let cert = ca.sign_node_csr(&nk.csr_pem, "store-1", NODE_CERT_LIFETIME).unwrap();
        // the client config accepts the pair, so key and certificate match
        client_config(&ca.cert_pem, Some((&cert, &nk.key_pem))).unwrap();
        let der = pem_to_der(&cert).unwrap();
        let text = String::from_utf8_lossy(&der);
        assert!(text.contains("outpost://node/store-1"));
        assert!(!text.contains("evil-name"));
        let exp = not_after_unix(&cert).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let days = (exp - now) / 86400;
        assert!((NODE_CERT_DAYS - 1..=NODE_CERT_DAYS).contains(&days), "{days}");
    }

    #[test]
    fn expired_client_certificates_pass_the_handshake_check_as_of_their_expiry() {
        let ca = CaMaterial::generate("t").unwrap();
        let nk = NodeKey::generate("n").unwrap();
        let now = time::OffsetDateTime::now_utc();
        let expired = ca
            .sign_node_csr_between(
                &nk.csr_pem,
                "n",
                now - time::Duration::days(10),
                now - time::Duration::days(1),
            )
            .unwrap();
        let der = pem_to_der(&expired).unwrap();
        let (nb, na) = validity_der(&der).unwrap();
        assert!(nb < na && na < now.unix_timestamp(), "{nb} {na}");
        let at_now = UnixTime::now();

        // The plain WebPKI verifier refuses it; ours accepts it.
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der().unwrap()).unwrap();
        let plain = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .unwrap();
        let err = plain.verify_client_cert(&der, &[], at_now).unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. })
            ),
            "{err:?}"
        );
        let ours = client_verifier(&ca).unwrap();
        ours.verify_client_cert(&der, &[], at_now).unwrap();

        // Anything else wrong still fails: another CA's certificate, expired or not.
        let other = CaMaterial::generate("other").unwrap();
        let foreign = other
            .sign_node_csr_between(
                &nk.csr_pem,
                "n",
                now - time::Duration::days(10),
                now - time::Duration::days(1),
            )
            .unwrap();
        assert!(ours
            .verify_client_cert(&pem_to_der(&foreign).unwrap(), &[], at_now)
            .is_err());
        let foreign_valid = other.sign_node_csr(&nk.csr_pem, "n", NODE_CERT_LIFETIME).unwrap();
        assert!(ours
            .verify_client_cert(&pem_to_der(&foreign_valid).unwrap(), &[], at_now)
            .is_err());
        // A valid certificate of our CA passes as before.
        let valid = ca
            .sign_node_csr(&nk.csr_pem, "n", std::time::Duration::from_secs(30))
            .unwrap();
        ours.verify_client_cert(&pem_to_der(&valid).unwrap(), &[], at_now)
            .unwrap();
        let (nb, na) = validity_unix(&valid).unwrap();
        assert_eq!(na - nb, 30 + 7, "30 s from a quarter of that ago");
        let nk2 = NodeKey::generate("n").unwrap();
        let long = ca.sign_node_csr(&nk2.csr_pem, "n", NODE_CERT_LIFETIME).unwrap();
        let (nb, na) = validity_unix(&long).unwrap();
        assert_eq!(na - nb, NODE_CERT_DAYS * 86_400 + 300, "90 days from 5 min ago");
    }

    #[test]
    fn fingerprint_is_stable_and_pem_roundtrips() {
        let ca = CaMaterial::generate("t").unwrap();
        assert_eq!(ca.fingerprint().unwrap(), ca.fingerprint().unwrap());
        assert_eq!(ca.fingerprint().unwrap().len(), 64);
        let (chain, key) = ca.issue_server(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        assert_eq!(certs_from_pem(&chain).len(), 2);
        server_config(&ca, &chain, &key).unwrap();
    }

    /// Drive a handshake between two in-memory connections; the error of the side that failed.
    fn handshake(c: &mut rustls::ClientConnection, s: &mut rustls::ServerConnection) -> Result<(), rustls::Error> {
        for _ in 0..20 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets()?;
            let mut buf = Vec::new();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        Err(rustls::Error::General("no progress".into()))
    }

    #[test]
    fn peers_authenticate_each_other_with_node_certificates() {
        install_provider();
        let ca = CaMaterial::generate("t").unwrap();
        let node = |name: &str, ca: &CaMaterial| {
            let nk = NodeKey::generate(name).unwrap();
            (
                ca.sign_node_csr(&nk.csr_pem, name, NODE_CERT_LIFETIME).unwrap(),
                nk.key_pem,
            )
        };
        let (a_cert, a_key) = node("box-a", &ca);
        let (b_cert, b_key) = node("box-b", &ca);
        let server = Arc::new(peer_server_config(&ca.cert_pem, &b_cert, &b_key).unwrap());
        let client = Arc::new(peer_client_config(&ca.cert_pem, &a_cert, &a_key).unwrap());
        let name = |n: &str| ServerName::try_from(n.to_string()).unwrap();
        // a dials b: both sides verified; b reads a's name from its certificate.
        let mut c = rustls::ClientConnection::new(client.clone(), name("box-b")).unwrap();
        let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
        handshake(&mut c, &mut s).unwrap();
        let peer = s.peer_certificates().unwrap()[0].clone();
        assert_eq!(node_of_der(&peer).as_deref(), Some("box-a"));
        // Dialling b under another name fails: the certificate is not that node's.
        let mut c = rustls::ClientConnection::new(client, name("box-c")).unwrap();
        let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
        assert!(handshake(&mut c, &mut s).is_err());
        // A node of another CA is refused by the accepting side.
        let other = CaMaterial::generate("other").unwrap();
        let (x_cert, x_key) = node("box-x", &other);
        let foreign = Arc::new(peer_client_config(&ca.cert_pem, &x_cert, &x_key).unwrap());
        let mut c = rustls::ClientConnection::new(foreign, name("box-b")).unwrap();
        let mut s = rustls::ServerConnection::new(server).unwrap();
        assert!(handshake(&mut c, &mut s).is_err());
    }
}

//! Microsoft Entra ID access tokens for ACR's audience, from a client secret, a certificate
//! assertion, a managed identity (IMDS, or the App Service / Container Apps endpoint) or a
//! workload identity's federated token file. The token is only ever traded at the registry's
//! `/oauth2/exchange`; the client does that step.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::RsaKeyPair;
use base64::Engine as _;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::ExposeSecret as _;

use super::auth::{self, Token};
use super::read_capped;
use crate::config::{ACR_AUDIENCE, EntraCredential};

/// IMDS API version whose answer shape is documented for VMs.
const IMDS_API_VERSION: &str = "2018-02-01";
/// App Service / Container Apps identity endpoint API version.
const APP_SERVICE_API_VERSION: &str = "2019-08-01";
/// Lifetime assumed when an Entra answer states none and the token is not a readable JWT.
const FALLBACK_LIFETIME: Duration = Duration::from_secs(300);
/// How long a client assertion is valid; Entra only needs it for the one request.
const ASSERTION_LIFETIME: u64 = 600;
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Why no Entra token could be had: the endpoint asked, and what went wrong there.
#[derive(Debug)]
pub struct EntraError {
    /// The token endpoint, without query.
    pub endpoint: String,
    /// What went wrong, with Entra's own error code and description when it sent them.
    pub reason: String,
}

/// A certificate credential: the certificate (for its thumbprint) and its RSA key.
pub struct Certificate {
    der: Vec<u8>,
    key: RsaKeyPair,
}

/// Reads a PEM file holding a certificate and its RSA private key (PKCS#8 or PKCS#1), as
/// `az ad sp create-for-rbac --create-cert` writes it.
pub fn read_certificate(path: &Path) -> Result<Certificate, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let der = CertificateDer::pem_slice_iter(&pem)
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| format!("{} holds no PEM certificate", path.display()))?
        .to_vec();
    let key = match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(PrivateKeyDer::Pkcs8(k)) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
        Ok(PrivateKeyDer::Pkcs1(k)) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
        Ok(_) => {
            return Err(format!(
                "{}: the private key is not an RSA key (Entra certificate credentials are RSA)",
                path.display()
            ));
        }
        Err(_) => return Err(format!("{} holds no PEM private key", path.display())),
    }
    .map_err(|e| format!("{}: unusable RSA private key: {e}", path.display()))?;
    Ok(Certificate { der, key })
}

/// Obtains an Entra access token for ACR's audience.
pub async fn token(
    http: &reqwest::Client,
    credential: &EntraCredential,
) -> Result<Token, EntraError> {
    let scope = format!("{ACR_AUDIENCE}/.default");
    match credential {
        EntraCredential::ClientSecret {
            authority_host,
            tenant_id,
            client_id,
            secret,
        } => {
            let endpoint = format!("{authority_host}{tenant_id}/oauth2/v2.0/token");
            let form = [
                ("grant_type", "client_credentials"),
                ("client_id", client_id),
                ("client_secret", secret.expose_secret()),
                ("scope", &scope),
            ];
            let sent = http.post(&endpoint).form(&form).send().await;
            answer(&endpoint, sent).await
        }
        EntraCredential::ClientCertificate {
            authority_host,
            tenant_id,
            client_id,
            certificate_file,
        } => {
            let endpoint = format!("{authority_host}{tenant_id}/oauth2/v2.0/token");
            let fail = |reason: String| EntraError {
                endpoint: endpoint.clone(),
                reason,
            };
            // Read at every refresh, so that a renewed certificate is used without a restart.
            let cert = read_certificate(certificate_file).map_err(fail)?;
            let assertion = client_assertion(&cert, &endpoint, client_id).map_err(fail)?;
            let form = [
                ("grant_type", "client_credentials"),
                ("client_id", client_id.as_str()),
                ("client_assertion_type", JWT_BEARER),
                ("client_assertion", &assertion),
                ("scope", &scope),
            ];
            let sent = http.post(&endpoint).form(&form).send().await;
            answer(&endpoint, sent).await
        }
        EntraCredential::WorkloadIdentity {
            authority_host,
            tenant_id,
            client_id,
            token_file,
        } => {
            let endpoint = format!("{authority_host}{tenant_id}/oauth2/v2.0/token");
            // The kubelet rotates the projected token: read it for every exchange.
            let assertion = std::fs::read_to_string(token_file).map_err(|e| EntraError {
                endpoint: endpoint.clone(),
                reason: format!("cannot read {}: {e}", token_file.display()),
            })?;
            let form = [
                ("grant_type", "client_credentials"),
                ("client_id", client_id.as_str()),
                ("client_assertion_type", JWT_BEARER),
                ("client_assertion", assertion.trim()),
                ("scope", &scope),
            ];
            let sent = http.post(&endpoint).form(&form).send().await;
            answer(&endpoint, sent).await
        }
        EntraCredential::ManagedIdentity {
            client_id,
            imds_endpoint,
            app_service,
        } => {
            let mut query = vec![("resource", ACR_AUDIENCE)];
            if let Some(id) = client_id {
                query.push(("client_id", id));
            }
            match app_service {
                Some((endpoint, header)) => {
                    query.push(("api-version", APP_SERVICE_API_VERSION));
                    let sent = http
                        .get(endpoint)
                        .query(&query)
                        .header("X-IDENTITY-HEADER", header.expose_secret())
                        .send()
                        .await;
                    answer(endpoint, sent).await
                }
                None => {
                    let endpoint = format!("{imds_endpoint}/metadata/identity/oauth2/token");
                    query.push(("api-version", IMDS_API_VERSION));
                    let sent = http
                        .get(&endpoint)
                        .query(&query)
                        .header("Metadata", "true")
                        .send()
                        .await;
                    answer(&endpoint, sent).await
                }
            }
        }
    }
}

/// Reads a token answer of Entra, IMDS or App Service: `access_token` and a lifetime from
/// `expires_in` (a number, or a string on IMDS), else `expires_on` (Unix seconds), else the
/// JWT's `exp`.
async fn answer(
    endpoint: &str,
    sent: Result<reqwest::Response, reqwest::Error>,
) -> Result<Token, EntraError> {
    let fail = |reason: String| EntraError {
        endpoint: endpoint.to_string(),
        reason,
    };
    let resp = sent.map_err(|e| fail(crate::cycle::error_chain(&e)))?;
    let status = resp.status();
    let body = read_capped(resp, 256 * 1024)
        .await
        .map_err(|_| fail("unreadable or oversized answer".to_string()))?;
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if !status.is_success() {
        let code = json.get("error").and_then(|v| v.as_str()).unwrap_or("");
        let description = json
            .get("error_description")
            .and_then(|v| v.as_str())
            .and_then(|d| d.lines().next())
            .unwrap_or("");
        let reason = match (code, description) {
            ("", "") => format!("status {}", status.as_u16()),
            (c, "") => format!("status {}: {c}", status.as_u16()),
            (c, d) => format!("status {}: {c}: {d}", status.as_u16()),
        };
        return Err(fail(reason));
    }
    let value = json
        .get("access_token")
        .and_then(|v| v.as_str())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| fail("the answer has no access_token".to_string()))?
        .to_string();
    let number = |key: &str| -> Option<i64> {
        match json.get(key)? {
            serde_json::Value::Number(n) => n.as_i64(),
            serde_json::Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    };
    let now_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let lifetime = number("expires_in")
        .filter(|s| *s > 0)
        .or_else(|| {
            number("expires_on")
                .map(|on| on - now_unix)
                .filter(|s| *s > 0)
        })
        .map(|s| Duration::from_secs(s as u64))
        .or_else(|| auth::jwt_lifetime(&value))
        .unwrap_or(FALLBACK_LIFETIME);
    Ok(auth::token_for(value, lifetime, Instant::now()))
}

/// A client assertion signed with the certificate's key (RS256), naming the certificate by
/// its SHA-1 (`x5t`) and SHA-256 (`x5t#S256`) thumbprints.
fn client_assertion(cert: &Certificate, audience: &str, client_id: &str) -> Result<String, String> {
    use aws_lc_rs::digest::{SHA1_FOR_LEGACY_USE_ONLY, SHA256, digest};
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let header = serde_json::json!({
        "alg": "RS256",
        "typ": "JWT",
        "x5t": b64(digest(&SHA1_FOR_LEGACY_USE_ONLY, &cert.der).as_ref()),
        "x5t#S256": b64(digest(&SHA256, &cert.der).as_ref()),
    });
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let claims = serde_json::json!({
        "aud": audience,
        "iss": client_id,
        "sub": client_id,
        "jti": uuid::Uuid::now_v7().to_string(),
        "nbf": now,
        "iat": now,
        "exp": now + ASSERTION_LIFETIME,
    });
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let mut signature = vec![0u8; cert.key.public_modulus_len()];
    cert.key
        .sign(
            &aws_lc_rs::signature::RSA_PKCS1_SHA256,
            &aws_lc_rs::rand::SystemRandom::new(),
            input.as_bytes(),
            &mut signature,
        )
        .map_err(|_| "signing the client assertion failed".to_string())?;
    Ok(format!("{input}.{}", b64(&signature)))
}
